"""One real local Ray per test session (small object store), started only by tests that need it."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False
        )
        started = True
    yield ray
    if started:
        ray.shutdown()
