"""One real local Ray per test session (small object store), started only by tests that need it."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Each test trains for seconds, so Ray Train's fixed costs dominate: its controller polls the workers every 2 s
# (finished runs wait for the next poll), and a preemption-watcher actor (one more process to start per run)
# watches for spot nodes being drained, which a local test Ray never has. Jobs keep Ray's defaults.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

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
