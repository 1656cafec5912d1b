"""`ray up configs/ray-cluster.yaml`, without the machines.

1. The launcher file passes Ray's own cluster-config validation, the code path `ray up` runs before it
   touches a host (`prepare_config`, which for the local provider builds its node type from head_ip /
   worker_ips, then `validate_config` against ray/autoscaler/ray-schema.json); so does the commented cloud
   variant at its end (head + GPU worker node types), put in place of the provider as its comment says.
2. The file's `ray start` commands, started on one machine as `ray.cluster_utils.Cluster` nodes (a head with
   the head command's flags, two GPU workers with the cloud variant's GPU count; Ray only counts GPUs, so
   none is needed): the TP=2 Serve config (configs/cluster-tp2.yaml, made small enough for a CPU: SmolLM2,
   float32, one CPU per rank, its per-rank `num_gpus: 1` kept) deploys onto it, answers a chat request, and
   its placement group is the planner's, on one GPU worker, with the replica (rank 0) and the rank-1 actor
   both on that worker's node. About 40 s on 2 cores.
"""

from __future__ import annotations

import copy
import os
import pathlib
import shlex
import threading
import time

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("jsonschema")

from raylight.testing.helpers import free_port, raylet_of, raylet_pid, serve_replica_pids, wait_healthy

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "configs" / "ray-cluster.yaml"
APP = "raylight-ray-up"


def launcher_config() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def cloud_variant() -> dict:
    """The launcher file with its commented cloud variant in place, as the file's comment says."""
    text = LAUNCHER.read_text()
    block = text.split("# >>> cloud variant\n", 1)[1].split("# <<< cloud variant", 1)[0]
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.splitlines()]
    variant = yaml.safe_load("\n".join(lines))
    config = launcher_config()
    config.pop("provider")
    config.update(variant)
    return config


def ray_start_flags(commands: list[str]) -> dict[str, str]:
    """The flags of the `ray start` among `commands`, e.g. {"--head": "", "--num-gpus": "0"}."""
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                flags, key = {}, None
                for w in words[2:]:
                    if w.startswith("--"):
                        key, _, value = w.partition("=")
                        flags[key] = value
                    elif key is not None:
                        flags[key], key = w, None
                return flags
    raise AssertionError(f"no `ray start` in {commands}")


def test_launcher_file_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    assert config["provider"]["type"] == "local" and config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    prepared = prepare_config(config)  # what `ray up` does first (aborts on what the local provider refuses)
    validate_config(prepared)
    assert prepared["available_node_types"]["local.cluster.node"]["min_workers"] == len(config["provider"]["worker_ips"])
    # setup_commands install raylight on every node, before each role's own commands
    for role in ("head", "worker"):
        assert any("pip install -e ~/raylight" in c for c in prepared[f"{role}_setup_commands"])
    assert "~/serve" in config["file_mounts"] and (REPO / config["file_mounts"]["~/serve"]).is_dir()
    assert (REPO / config["file_mounts"]["~/serve"] / "cluster-tp2.yaml").is_file()
    head = ray_start_flags(config["head_start_ray_commands"])
    assert "--head" in head and head["--num-gpus"] == "0" and head["--dashboard-host"] == "127.0.0.1"
    assert ray_start_flags(config["worker_start_ray_commands"])["--address"] == "$RAY_HEAD_IP:6379"


def test_cloud_variant_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cloud_variant()
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 2


def test_a_bad_launcher_file_is_refused():
    """The validation is real: a misspelt key fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cloud_variant()
    config["available_node_types"]["gpu_worker"]["resorces"] = {"GPU": 4}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


# ---------------------------------------------------------------- the simulated cluster

@pytest.fixture(scope="module")
def simulated_cluster():
    """A head and two GPU workers started with the launcher file's `ray start` flags (GPUs as the cloud
    variant's worker type declares; CPUs scaled down to this machine)."""
    from ray.cluster_utils import Cluster

    config = launcher_config()
    head_flags = ray_start_flags(config["head_start_ray_commands"])
    worker_flags = ray_start_flags(config["worker_start_ray_commands"])
    assert "--head" in head_flags and "--address" in worker_flags
    worker_gpus = int(cloud_variant()["available_node_types"]["gpu_worker"]["resources"]["GPU"])
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        # As tests/integration/test_placement_ray.py: keep this cluster's address out of /tmp/ray, where a
        # bare `ray.init()` or `serve run` in another process would join it.
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        c = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, num_gpus=int(head_flags.get("--num-gpus", 0)), include_dashboard=False))
        try:
            workers = [c.add_node(num_cpus=2, num_gpus=worker_gpus) for _ in range(2)]
            c.wait_for_nodes()
            ray.init(address=c.address)
            yield c, workers
        finally:
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                c.shutdown()


def pids_titled(tag: bytes) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().startswith(tag):
                        pids.append(int(d))
            except OSError:
                continue
    return pids


def test_tp2_serve_config_deploys_onto_the_cluster_where_the_planner_says(simulated_cluster, smollm2_dir):
    from ray import serve
    from ray.util import placement_group_table

    from raylight.cluster.app import build_app
    from raylight.placement import plan_for_replica

    cluster, workers = simulated_cluster
    serve_config = yaml.safe_load((REPO / "configs" / "cluster-tp2.yaml").read_text())
    [app] = serve_config["applications"]
    args = copy.deepcopy(app["args"])
    engine = args["engine_args"]
    assert engine["tensor_parallel_size"] == 2 and args["ray_actor_options"]["num_gpus"] == 1
    # Small enough for a CPU; the parallel layout and the per-rank GPU are the shipped file's.
    args["model"] = smollm2_dir
    for key in ("gpu_memory_utilization", "dtype"):
        engine.pop(key, None)
    engine.update(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=512,
                  kv_cache_memory=2**26)
    args["ray_actor_options"]["num_cpus"] = 1
    args["default_max_tokens"] = 8
    plan = plan_for_replica(args["ray_actor_options"], engine["tensor_parallel_size"], engine["pipeline_parallel_size"],
                            device=engine["device"])
    assert plan.bundle_list() == [{"GPU": 2.0, "CPU": 2.0}] and plan.strategy == "STRICT_PACK"

    port = free_port()
    serve.start(proxy_location=serve_config["proxy_location"],
                http_options={"host": serve_config["http_options"]["host"], "port": port})
    deployed: dict = {}

    def deploy():
        try:
            serve.run(build_app(args), name=APP, route_prefix=app["route_prefix"])
            deployed["ok"] = True
        except Exception as e:  # reported below
            deployed["error"] = e

    runner = threading.Thread(target=deploy, daemon=True)
    runner.start()
    runner.join(240)
    assert deployed.get("ok"), deployed or "serve.run did not return in 240 s"
    base = f"http://127.0.0.1:{port}"
    assert wait_healthy(base, 60)
    name = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1

    # The replica's placement group is the planner's, and it sits on one GPU worker (the head has no GPU).
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
    ours = [g for g in groups if list(g["bundles"].values()) == plan.bundle_list()]
    assert len(ours) == 1, groups
    assert ours[0]["strategy"] == plan.strategy
    [group_node] = set(ours[0]["bundles_to_node_id"].values())
    by_id = {w.node_id: w for w in workers}
    assert group_node in by_id, "the TP group is not on a GPU worker"
    worker = by_id[group_node]
    # Rank 0 (the Serve replica) and rank 1 (a Ray actor in the same bundle) run on that worker's node.
    [replica] = serve_replica_pids(APP, "EngineReplica")
    assert raylet_of(replica) == raylet_pid(worker)
    ranks = pids_titled(b"ray::RankActor")
    assert len(ranks) == 1 and raylet_of(ranks[0]) == raylet_pid(worker), ranks
    # Both of that worker's planned GPUs are taken; the other worker's are untouched.
    free = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
    avail = ray._private.state.available_resources_per_node()
    other = next(w for w in workers if w is not worker)
    assert avail[other.node_id].get("GPU", 0) == free[other.node_id]
    assert avail[worker.node_id].get("GPU", 0) == free[worker.node_id] - 2
    serve.delete(APP)
    deadline = time.monotonic() + 30
    while [g for g in placement_group_table().values() if g["state"] == "CREATED"] and time.monotonic() < deadline:
        time.sleep(0.5)
