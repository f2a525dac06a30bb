"""Starts a real `custody dev` on a free port for the AWS client tests."""

import json
import os
import pathlib
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def custody_bin():
    path = os.environ.get("CUSTODY_BIN", str(ROOT / "target" / "debug" / "custody"))
    if not os.path.exists(path):
        pytest.fail(f"custody binary not found at {path}: run `cargo build` or set CUSTODY_BIN")
    return path


@pytest.fixture(scope="session")
def custody():
    """A running `custody dev`: yields its environment (CUSTODY_* and AWS_* variables)."""
    workdir = tempfile.mkdtemp(prefix="custody-pytest-")
    log = open(os.path.join(workdir, "server.log"), "w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "AWS_"))}
    env["RUST_LOG"] = "info"
    proc = subprocess.Popen(
        [custody_bin(), "--json", "dev", "--data", os.path.join(workdir, "data"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    buf = ""
    info = None
    while info is None:
        ch = proc.stdout.read(1)
        if not ch:
            log.seek(0)
            pytest.fail("custody dev exited early:\n" + log.read())
        buf += ch
        if ch == "}":
            try:
                info = json.loads(buf)
            except json.JSONDecodeError:
                pass
    variables = {}
    for line in pathlib.Path(info["EnvFile"]).read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        variables[name] = value
    variables["_LOG"] = log.name
    variables["_WORKDIR"] = workdir
    yield variables
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def aws_env(custody, monkeypatch):
    """The process environment pointed at custody exactly as a user would: AWS_ENDPOINT_URL_KMS,
    AWS_CA_BUNDLE, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in custody.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return custody
