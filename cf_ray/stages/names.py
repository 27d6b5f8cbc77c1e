"""The names of a run's stages and of its datasets, spelled once (the stage table, the CLI and the report use them)."""

MODELS = ("random", "pretrained", "clusterfit")  # transfer compares these; random init is the floor
SPLITS = ("train", "test")  # of every transfer target; its datasets are named <target>_<split>
TRANSFER = "transfer_"
EXTRACT = "extract_"


def dataset(target: str, split: str) -> str:
    return f"{target}_{split}"


def items(target: str) -> str:
    return f"items_{target}"


def extract(model: str, data: str) -> str:
    return f"{EXTRACT}{model}_{data}"


def transfer(target: str) -> str:
    return TRANSFER + target


def finetuned(model: str, target: str) -> str:
    """Name of ``model`` fine-tuned on ``target`` (its folder under models/ and features/)."""
    return f"finetuned_{model}_{target}"


def model_stage(model: str) -> str:
    """The stage that makes ``model``'s backbone."""
    return "retrain" if model == "clusterfit" else "pretrain"
