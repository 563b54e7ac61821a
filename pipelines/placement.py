"""How a stage task is placed and wired on Kubernetes: GPU type and count, node selector and
tolerations of the GPU pool (pipeline parameters), a memory-backed /dev/shm, S3 credentials from an
optional Secret and the endpoint from a ConfigMap (never literal values in the YAML), an optional
Hugging Face token Secret and the model cache volume for the stages that load models, non-root,
resource requests and limits, retries with exponential backoff, and a caching choice per stage.

Hardening beyond non-root: kfp-kubernetes (2.17) expresses only runAsUser, runAsGroup and
runAsNonRoot in a task's security context. allowPrivilegeEscalation, dropped capabilities and the
seccomp profile come from the cluster (manifests/cluster/pod-hardening, an admission policy); a
read-only root filesystem is not set, for the reasons in manifests/README.md ("Pod hardening").
"""

from kfp import dsl, kubernetes

S3_SECRET = "patchgap-s3"
S3_CONFIG_MAP = "patchgap-s3-config"
SHM_SIZE = "16Gi"
#: Hub downloads: HF_TOKEN from this Secret when it exists (gated models need it).
HF_SECRET = "patchgap-hf"
#: Models (hub snapshots, s3:// model folders) are cached on this claim, mounted where the images
#: keep their caches (HF_HOME=/cache/huggingface, PATCHGAP_CACHE_DIR=/cache/patchgap).
MODEL_CACHE_PVC = "patchgap-model-cache"
MODEL_CACHE_PATH = "/cache"

#: A light CPU step (staging, sharding, the ledger): what it needs and the most it may take.
CPU_REQUEST, CPU_LIMIT = "500m", "2"
MEMORY_REQUEST, MEMORY_LIMIT = "1Gi", "8Gi"

#: Retries: a preempted GPU pod or a flaky S3 call should not fail a day-long run. The stages
#: resume from their checkpoints, so a retry loses at most one checkpoint interval.
RETRIES = 3
BACKOFF = "60s"
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = "3600s"


def with_s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 credentials from the Secret, endpoint and region from the ConfigMap; both optional.
    Without the Secret (IRSA, Workload Identity) credentials come from the pod's default
    provider chain."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
        optional=True,
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=S3_CONFIG_MAP,
        config_map_key_to_env={
            "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
            "AWS_REGION": "AWS_REGION",
        },
        optional=True,
    )
    return task


def cpu_task(
    task: dsl.PipelineTask, *, cache: bool = True, local: bool = False, light: bool = True
) -> dsl.PipelineTask:
    """A light step: S3 env, non-root, resources, retries. ``local`` (kfp.local runs) keeps
    only the caching choice: Kubernetes settings are no-ops there. ``light=False`` leaves the
    resources to the caller (a GPU stage sizes its own)."""
    task.set_caching_options(cache)
    if local:
        return task
    with_s3(task)
    kubernetes.set_security_context(task, run_as_user=1000, run_as_group=1000, run_as_non_root=True)
    if light:
        task.set_cpu_request(CPU_REQUEST).set_cpu_limit(CPU_LIMIT)
        task.set_memory_request(MEMORY_REQUEST).set_memory_limit(MEMORY_LIMIT)
    task.set_retry(
        RETRIES,
        backoff_duration=BACKOFF,
        backoff_factor=BACKOFF_FACTOR,
        backoff_max_duration=BACKOFF_MAX,
    )
    return task


def gpu_task(
    task: dsl.PipelineTask,
    *,
    accelerator_type,
    gpu_count,
    node_selector,
    tolerations,
    cache: bool,
    memory_limit: str = "64Gi",
    local: bool = False,
) -> dsl.PipelineTask:
    """A GPU stage on the GPU pool (all placement values may be pipeline parameters).

    ``local`` builds the same graph for kfp.local, which cannot resolve accelerator settings
    given as pipeline parameters inside a ParallelFor; placement means nothing there anyway."""
    cpu_task(task, cache=cache, local=local, light=False)
    if local:
        return task
    task.set_accelerator_type(accelerator_type)
    task.set_accelerator_limit(gpu_count)
    task.set_memory_limit(memory_limit)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.use_secret_as_env(
        task, secret_name=HF_SECRET, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"}, optional=True
    )
    kubernetes.mount_pvc(task, pvc_name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_PATH)
    # NCCL and dataloader workers need more shared memory than a container's default 64 MiB.
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    return task


def placers(*, local: bool, accelerator_type, gpu_count, node_selector, tolerations):
    """The two placement functions a pipeline body uses, bound to its GPU-pool parameters:
    ``gpu(task, cache, count=gpu_count)`` and ``cpu(task, cache=True)``."""

    def gpu(task: dsl.PipelineTask, cache: bool, count=gpu_count) -> dsl.PipelineTask:
        return gpu_task(
            task,
            accelerator_type=accelerator_type,
            gpu_count=count,
            node_selector=node_selector,
            tolerations=tolerations,
            cache=cache,
            local=local,
        )

    def cpu(task: dsl.PipelineTask, cache: bool = True) -> dsl.PipelineTask:
        return cpu_task(task, cache=cache, local=local)

    return gpu, cpu
