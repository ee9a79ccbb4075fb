import pytest

from tests.process import DacheProcess

# A real PostgreSQL: fixtures postgres, own_postgres, pg, own_pg.
pytest_plugins = ["tests.postgres"]


@pytest.fixture
def dache_process(tmp_path):
    """
    A factory for `twistd -n dache` subprocesses, all killed at teardown. Each
    gets its own DISK_PATH under tmp_path unless the test gives one, so no
    test writes into the checkout.
    """
    started: list[DacheProcess] = []

    def start(env=None, args=(), wait=True, timeout=30.0, ephemeral_port=True):
        env = dict(env or {})
        env.setdefault("DISK_PATH", str(tmp_path / f"dache-data-{len(started)}"))
        process = DacheProcess(env, tuple(args), ephemeral_port=ephemeral_port)
        started.append(process)
        return process.start(timeout=timeout, wait=wait)

    yield start
    for process in started:
        process.stop()


def pytest_terminal_summary(terminalreporter):
    """What the deploy tests observed (image size, exposure score, ...), for the reader."""
    from tests.podman import REPORT

    if REPORT:
        terminalreporter.section("deploy checks observed")
        for line in REPORT:
            terminalreporter.write_line(line)
