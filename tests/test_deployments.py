"""prefect.yaml points at real flows with real parameters."""

import importlib
import inspect
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_each_deployment_entrypoint_is_a_flow_taking_its_parameters():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {
        "training.py:federated_training": "federated-training",
        "study.py:hpo_study": "hpo-study",
        "comparison.py:method_comparison": "method-comparison",
    }
    assert config["deployments"]
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function)
        assert flow.name == names[f"{Path(path).name}:{function}"]
        accepted = inspect.signature(flow.fn).parameters
        assert set(deployment.get("parameters", {})) <= set(accepted)
