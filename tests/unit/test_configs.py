"""Internal surfaces and start-up of the shipped Serve configs (configs/*.yaml), and a source scan:

* every config binds our HTTP proxy to 127.0.0.1 and says how Ray's dashboard stays on it (a Serve
  config cannot set the dashboard's host: the Ray cluster's start does, `ray start --dashboard-host`,
  whose default, like `ray.init`'s, is 127.0.0.1);
* every config's application bounds the start attempts of its deployments (Serve's
  `max_constructor_retry_count`), so replicas that cannot start end in DEPLOY_FAILED;
* no module of raylight/ unpickles data from the network: the step channel and the rank reports
  are int64 tensors. The few modules that touch pickle at all are listed with the reason.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
PKG = REPO / "raylight"
# The Serve configs; configs/ray-cluster.yaml is a Ray cluster launcher file (tests/integration/test_ray_up.py).
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "ray-cluster.yaml")


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"cluster.yaml", "cluster-tp2.yaml", "cluster-moe.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_binds_http_to_loopback(path):
    config = yaml.safe_load(path.read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    text = path.read_text()
    assert "--dashboard-host 127.0.0.1" in text, "say how the Ray dashboard stays on 127.0.0.1"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_bounds_replica_start_attempts(path):
    pytest.importorskip("ray.serve")
    from raylight.cluster.app import build_app

    for app_config in yaml.safe_load(path.read_text())["applications"]:
        app = build_app(app_config["args"])
        ingress = app._bound_deployment
        pool = ingress.init_args[0]._bound_deployment
        for deployment in (ingress, pool):
            assert deployment._deployment_config.max_constructor_retry_count == 3, deployment.name


# Modules that may touch pickle, and why none of them reads network data with it.
PICKLE_ALLOWED = {
    "workers/launchers.py": "pickles rank 0's own RankSpec into the stdin pipe of the rank process it just "
                            "started (same machine, a pipe it created; what multiprocessing's spawn does)",
    "workers/rank_main.py": "the child end of that pipe: unpickles what its parent wrote to its stdin",
}
PICKLE_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "_pickle", "joblib"}
PICKLING_CALLS = {"load", "loads",  # torch.load, pickle.load(s), numpy.load(..., allow_pickle=True)
                  "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                  "send_object_list", "recv_object_list", "recv_object"}


def _pickle_uses(path: pathlib.Path) -> list[str]:
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            uses += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            uses.append(f"from {node.module} import")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            if name in ("load", "loads") and owner.split(".")[0] not in ("torch", "np", "numpy", *PICKLE_MODULES):
                continue  # json.loads, yaml, safetensors' load ...: no pickle
            if name in PICKLING_CALLS:
                uses.append(f"{owner}.{name}()")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            uses.append("allow_pickle=")
    return uses


def test_no_module_unpickles_network_data():
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel.startswith("testing/"):
            continue
        uses = _pickle_uses(path)
        if uses and rel not in PICKLE_ALLOWED:
            found[rel] = uses
    assert not found, f"pickle where network data may arrive (add a reason to PICKLE_ALLOWED only if not): {found}"
    for rel in PICKLE_ALLOWED:
        assert _pickle_uses(PKG / rel), f"{rel} no longer uses pickle: drop it from PICKLE_ALLOWED"


def test_the_scan_sees_pickle():
    """The scan itself: each kind of use is caught."""
    import tempfile

    src = ("import pickle\nfrom cloudpickle import loads\nimport torch\nx = torch.load('f')\n"
           "import torch.distributed as dist\ndist.broadcast_object_list([1])\nimport numpy as np\n"
           "np.load('f', allow_pickle=True)\nimport json\njson.loads('{}')\n")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    uses = _pickle_uses(pathlib.Path(f.name))
    assert uses == ["import pickle", "from cloudpickle import", "torch.load()", "dist.broadcast_object_list()",
                    "np.load()", "allow_pickle="], uses
