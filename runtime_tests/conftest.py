"""Options and fixtures of the runtime_tests suite (torch-free: numpy and the runners only).

    pytest runtime_tests --bundle dist/pixel8 --runner host|emulator|ssh://user@host[:port]|adb[:serial]
        [--data eval.tsv] [--artifact NAME]... [--threads N] [--warmup 5] [--runs 20]
        [--cpu cortex-a76] [--sysroot DIR]                         (emulator)
        [--key FILE --known-hosts FILE] [--remote-python CMD] [--remote-env K=V]...   (ssh)
        [--results DIR]   check results already stored by `edgelm validate` instead of running the artifacts

The session runs the bundle on the runner once (:func:`edgelm.validate.bundle.run_bundle`), evaluates the
checks (:func:`edgelm.validate.bundle.evaluate`), and at the end writes ``validation.json`` and the runner's
section of ``report.md`` (:func:`edgelm.validate.bundle.write_validation`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

RECORD = pytest.StashKey[dict]()
BUNDLE = pytest.StashKey[object]()


def pytest_addoption(parser):
    g = parser.getgroup("edgelm", "edgelm on-target validation")
    g.addoption("--bundle", help="the export bundle to validate (dist/<device>/)")
    g.addoption("--runner", default="host", help="host, emulator, ssh://user@host[:port], adb or adb:SERIAL")
    g.addoption("--results", default=None, help="check the results stored in this directory; do not run")
    g.addoption(
        "--data", default=None, help="an extra labeled eval file (TSV/CSV/JSONL), tokenized with the bundle's tokenizer"
    )
    g.addoption("--text-column", default=None)
    g.addoption("--label-column", default=None)
    g.addoption("--limit", type=int, default=None, help="use at most this many rows of --data")
    g.addoption("--artifact", action="append", default=None, help="validate only this artifact (repeatable)")
    g.addoption("--threads", type=int, default=None, help="runtime threads (default: the recipe's)")
    g.addoption("--warmup", type=int, default=5)
    g.addoption("--runs", type=int, default=20)
    g.addoption("--cpu", default=None, help="emulator: qemu CPU model (default: from the device profile)")
    g.addoption("--sysroot", default=None, help="emulator: the sysroot (default: the user cache)")
    g.addoption("--key", default=None, help="ssh: private key file")
    g.addoption("--known-hosts", default=None, help="ssh: pinned known_hosts file")
    g.addoption("--remote-python", default="python3", help="ssh: the command that starts Python on the board")
    g.addoption("--remote-env", action="append", default=None, help="ssh: K=V set for the target script")


def _bundle(config):
    from edgelm.bundle import Bundle
    from edgelm.errors import EdgeLMError

    if BUNDLE not in config.stash:
        path = config.getoption("--bundle")
        if not path:
            raise pytest.UsageError("runtime_tests need --bundle dist/<device>/ (a bundle from `edgelm export`)")
        try:
            config.stash[BUNDLE] = Bundle.load(path)
        except EdgeLMError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config.stash[BUNDLE]


def pytest_generate_tests(metafunc):
    if "artifact" in metafunc.fixturenames:
        names = metafunc.config.getoption("--artifact") or _bundle(metafunc.config).artifact_names
        metafunc.parametrize("artifact", names)


@pytest.fixture(scope="session")
def bundle(pytestconfig):
    return _bundle(pytestconfig)


@pytest.fixture(scope="session")
def record(pytestconfig, bundle) -> dict:
    """The runner's validation record (see :func:`edgelm.validate.bundle.evaluate`)."""
    from edgelm.errors import EdgeLMError
    from edgelm.validate.bundle import bundle_runner, evaluate, run_bundle
    from edgelm.validate.runners import parse_env

    opt = pytestconfig.getoption
    try:
        results = opt("--results")
        if results is None:
            runner = bundle_runner(
                bundle,
                opt("--runner"),
                cpu=opt("--cpu"),
                sysroot=opt("--sysroot"),
                key_file=opt("--key"),
                known_hosts=opt("--known-hosts"),
                remote_python=opt("--remote-python"),
                remote_env=parse_env(opt("--remote-env")),
            )
            results = run_bundle(
                bundle,
                runner,
                artifacts=opt("--artifact"),
                data=opt("--data"),
                text_column=opt("--text-column"),
                label_column=opt("--label-column"),
                limit=opt("--limit"),
                threads=opt("--threads"),
                warmup=opt("--warmup"),
                runs=opt("--runs"),
            )
        rec = evaluate(bundle, Path(results))
    except EdgeLMError as exc:
        pytest.fail(f"cannot validate {bundle.path} on {opt('--runner')}: {exc}", pytrace=False)
    pytestconfig.stash[RECORD] = rec
    return rec


def pytest_sessionfinish(session, exitstatus):
    rec = session.config.stash.get(RECORD, None)
    if rec is not None:
        from edgelm.validate.bundle import write_validation

        write_validation(session.config.stash[BUNDLE], rec)
