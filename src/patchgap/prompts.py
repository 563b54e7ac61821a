"""Prompt templates: the rewriting prompt (rewriter and prompt-only baseline) and the downstream
evaluation prompt. Templates are ``str.format`` strings with named fields and are configurable."""

from __future__ import annotations

from patchgap.errors import ConfigError

#: The rewriter's instruction. It asks for the same reasoning and final answer in the model's own
#: words and must not let the rewrite mention that it is a rewrite (arXiv 2602.11220).
REWRITE_TEMPLATE = (
    "Here is a problem and a worked solution written by an expert.\n\n"
    "Problem:\n{question}\n\n"
    "Expert solution:\n{solution}\n\n"
    "Solve the problem yourself, following the same reasoning and reaching the same final answer, "
    "but explain it step by step in your own words, the way you would naturally answer. "
    "Do not mention the expert solution or that you are rewriting anything. "
    "End with the final answer in the form \\boxed{{answer}}."
)

#: Downstream math evaluation: step by step, final answer boxed (arXiv 2602.11220).
MATH_EVAL_TEMPLATE = (
    "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)

#: The paper's generative multiple-choice form: answer with the boxed option letter.
CHOICE_EVAL_TEMPLATE = (
    "{question}\n\n{options}\n\n"
    "Think step by step, then give the letter of the correct option within \\boxed{{}}."
)


def render(template: str, **fields: str) -> str:
    """Fill a template; a missing or unknown placeholder is a ConfigError naming it."""
    try:
        return template.format(**fields)
    except KeyError as err:
        raise ConfigError(
            f"prompt template uses {{{err.args[0]}}} but only {sorted(fields)} are available"
        ) from None
    except (IndexError, ValueError) as err:
        raise ConfigError(f"prompt template is malformed: {err}") from None


def rewrite_messages(
    question: str, solution: str, template: str = REWRITE_TEMPLATE
) -> list[dict[str, str]]:
    """Chat messages asking the rewriter to rewrite ``solution`` for ``question``."""
    return [{"role": "user", "content": render(template, question=question, solution=solution)}]


def math_eval_messages(question: str, template: str = MATH_EVAL_TEMPLATE) -> list[dict[str, str]]:
    """Chat messages for a downstream math problem."""
    return [{"role": "user", "content": render(template, question=question)}]


def choice_eval_messages(
    question: str,
    options: list[str],
    labels: str = "ABCDEFGHIJ",
    template: str = CHOICE_EVAL_TEMPLATE,
) -> list[dict[str, str]]:
    """Chat messages for a multiple-choice item in the paper's generative (boxed letter) form."""
    if len(options) > len(labels):
        raise ConfigError(f"{len(options)} options but only {len(labels)} labels")
    text = "\n".join(f"({labels[i]}) {opt}" for i, opt in enumerate(options))
    return [{"role": "user", "content": render(template, question=question, options=text)}]
