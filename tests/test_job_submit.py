"""README "Run on a cluster", run for real: every command block except provisioning, through `ray job submit`.

The head is started with cluster.yaml's own head start command (token authentication, dashboard and job
server on 127.0.0.1), on this machine: node IP 127.0.0.1, free ports, a private temp folder and HOME (so
`ray get-auth-token --generate` writes a token nobody else's Ray picks up). The README blocks run as
written, with only these substitutions: the head's dashboard port for 8265, a temporary folder for
/mnt/smn/results, the `_small` digits variants of the GPU-scale specs, and overrides that shrink epochs
and data. The head is stopped by killing its own processes (`ray stop` would stop every Ray on
the machine).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from orchestrator.results import ledger
from orchestrator.spec.experiment import expand_cells, load_spec

from .conftest import REPO

README = REPO / "docs" / "cluster.md"  # the cluster guide moved out of README.md (issue 24)
VENV_BIN = str(Path(sys.executable).parent)
BLOCKS = ("provisioning", "token", "env", "experiment", "sweep", "follow", "status-stop", "resume", "cascade",
          "table")
NOT_RUN = {"provisioning"}  # the cloud itself: `ray up`, `ray dashboard` (SSH), `ray down`

_DATA = ("pretrain.train.epochs=1 pretrain.dataset.max_train_samples=300 dataset.max_train_samples=160 "
         "dataset.max_test_samples=100 eval.knn_k=20")
SMOKE = {
    "experiment": f"train.epochs=1 'seeds=[0]' {_DATA}",  # one seed: the job's path is the same for three
    # longer cells, one at a time, so that the job can be stopped between two landings
    # long enough per cell (warm workers start a cell in under a second) that the stop lands mid-sweep
    # (the stop, two `ray job` commands, follows the first landing within seconds; the job has two 8-epoch cells left)
    "sweep": f"train.epochs=8 {_DATA} resources.max_concurrent_cells=1",
    "resume": f"train.epochs=8 {_DATA} resources.max_concurrent_cells=1",
    # the whole train split and small batches: the router's 5 clusters must each hold a batch
    "cascade": "train.epochs=1 train.batch_size=16 pretrain.train.epochs=1 pretrain.dataset.max_train_samples=300 "
               "dataset.max_test_samples=100 cascade.experts.epochs=1",
}


def readme_blocks() -> dict[str, str]:
    """``{tag: code}`` of the ```bash blocks of README's "Run on a cluster" section."""
    text = README.read_text()
    start = text.index("\n## Run on a cluster\n")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end == -1 else text[start:end]
    blocks = re.findall(r"<!-- readme-test: ([\w-]+) -->\n```bash\n(.*?)```", section, re.S)
    assert section.count("```") == 2 * len(blocks), "every fenced block of the section needs a readme-test tag"
    return dict(blocks)


@pytest.mark.unit
def test_every_readme_cluster_command_is_tagged_and_run_here():
    """The section's command blocks are exactly the ones this file runs (plus provisioning)."""
    blocks = readme_blocks()
    assert tuple(blocks) == BLOCKS
    assert all("ray up" not in code and "ray down" not in code for tag, code in blocks.items() if tag not in NOT_RUN)
    for tag in ("experiment", "sweep", "resume", "cascade", "table"):
        assert "ray job submit --address http://127.0.0.1:8265" in blocks[tag], tag
        assert "/mnt/smn/results" in blocks[tag], tag


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_marked(marker: str) -> None:
    """Kill the processes whose command line names ``marker`` (this head's temp folder) and their children."""
    me = os.getpid()
    found = [p for p in psutil.process_iter(["cmdline"]) if p.pid != me
             and any(marker in a for a in (p.info["cmdline"] or []))]
    tree = {}
    for p in found:
        tree[p.pid] = p
        try:
            tree.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in tree.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(tree.values()), timeout=30)


class Head:
    """A Ray head on 127.0.0.1 and the README's commands run against it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.home = tmp / "home"
        self.home.mkdir()
        self.results = str(tmp / "results")
        self.temp_dir = tempfile.mkdtemp(prefix="smnj", dir="/tmp")  # short: Ray's socket paths live under it
        self.dash_port = None  # set by start()
        self.env = {**os.environ, "HOME": str(self.home), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_MODE", None)  # the README's env block sets it
        self.blocks = readme_blocks()

    def code(self, tag: str) -> str:
        code = self.blocks[tag]
        code = code.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{self.dash_port}")
        code = code.replace("/mnt/smn/results", self.results)
        for spec in ("table5a_prototypes", "table3_cascade"):  # GPU-scale specs -> their digits variants
            code = code.replace(f"experiments/{spec}.yaml", f"experiments/{spec}_small.yaml")
        if tag in SMOKE:
            code, n = re.subn(r"(-- smn (?:run|cascade) .*--results \S+)", rf"\1 {SMOKE[tag]}", code)
            assert n == 1, code
        return code

    def run(self, tag: str, timeout: float = 1200, background: bool = False):
        script = f"set -euo pipefail\n{self.blocks['env']}\n{self.code(tag)}"
        if background:
            return subprocess.Popen(["bash", "-c", script], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        out = subprocess.run(["bash", "-c", script], cwd=REPO, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        return out.returncode, out.stdout + out.stderr

    def ray(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        out = subprocess.run(["ray", *args], cwd=REPO, env={**self.env, "RAY_AUTH_MODE": "token"},
                             capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout + out.stderr

    def start(self) -> None:
        """Start the head with cluster.yaml's head start command (ports and local settings substituted).

        A raylet gives its agents a fixed 15 s to start (ray-project/ray#65983), which a loaded 2-core
        machine can miss; such a start is cleaned up and retried with fresh ports (3 tries)."""
        cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
        (template,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
        template = template.split(";", 1)[1]  # drop `ulimit -n 65536`
        template = re.sub(r" --autoscaling-config=\S+", "", template)  # no cloud to scale here
        assert "RAY_AUTH_MODE=token" in template and "--dashboard-host=127.0.0.1" in template
        for attempt in range(3):
            (self.gcs_port, self.dash_port, self.om_port, self.client_port, *agent_ports) = _free_ports(7)
            listen, grpc, renv = agent_ports
            line = (template.replace("--port=6379", f"--port={self.gcs_port}")
                    .replace("--dashboard-port=8265", f"--dashboard-port={self.dash_port}")
                    .replace("--object-manager-port=8076", f"--object-manager-port={self.om_port}"))
            # explicit ports: fixed defaults (52365, 10001) may be held by another Ray on this machine
            line += (f" --node-ip-address=127.0.0.1 --num-cpus=2 --temp-dir={self.temp_dir}"
                     f" --ray-client-server-port={self.client_port} --dashboard-agent-listen-port={listen}"
                     f" --dashboard-agent-grpc-port={grpc} --runtime-env-agent-port={renv}")
            out = subprocess.run(["bash", "-c", line], cwd=REPO, env=self.env, capture_output=True, text=True,
                                 timeout=300)
            if out.returncode == 0:
                return
            self.stop()
            os.makedirs(self.temp_dir)
            assert "timed out during startup" in out.stdout + out.stderr, out.stdout + out.stderr
        pytest.fail(f"the head did not start in 3 tries:\n{out.stdout}{out.stderr}")

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the head's job agent accepts a job (it registers some seconds after `ray start`)."""
        deadline = time.time() + timeout
        while True:
            rc, out = self.ray("job", "submit", "--address", f"http://127.0.0.1:{self.dash_port}", "--", "true")
            if rc == 0:
                return
            assert "No available agent" in out and time.time() < deadline, out
            time.sleep(3)

    def stop(self) -> None:
        _kill_marked(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = Head(tmp_path_factory.mktemp("jobs"))
    rc, out = h.run("token")  # the README's token command, into this test's HOME
    assert rc == 0, out
    token = (h.home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32
    h.token = token
    try:
        h.start()
        h.wait_ready()
        yield h
    finally:
        h.stop()


def _ledger_files(results: str, experiment: str) -> dict[str, int]:
    folder = Path(results) / experiment / "ledger"
    return {p.stem: p.stat().st_mtime_ns for p in folder.glob("*.parquet")} if folder.exists() else {}


def _cells_of(code: str) -> tuple[str, set[str]]:
    """Experiment name and cell ids of the `smn run` command inside a README block (after substitution)."""
    args = shlex.split(code.replace("\\\n", " "))
    i = args.index("smn")
    spec, rest = args[i + 2], args[i + 3:]
    overrides = [a for a in rest if "=" in a and not a.startswith("--")]
    spec = load_spec(REPO / spec, overrides)
    return spec.name, {c.cell_id for c in expand_cells(spec)}


@pytest.mark.cluster
@pytest.mark.slow
def test_job_server_is_local_and_needs_the_token(head):
    listening = [c for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == head.dash_port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
    url = f"http://127.0.0.1:{head.dash_port}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=30)
    assert err.value.code in (401, 403)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and isinstance(json.loads(resp.read()), list)


@pytest.mark.cluster
@pytest.mark.slow
def test_readme_jobs_run_stop_resume_cascade_and_table(head):
    results = head.results
    # 1. a single experiment, submitted and waited for
    t0 = time.time()
    rc, out = head.run("experiment")
    assert rc == 0, out
    _, demo_cells = _cells_of(head.code("experiment"))
    assert len(demo_cells) == 3  # 3 methods x seed 0 ready at once; the 2 random-mask controls wait for their SMN cell
    assert ("experiment demo: 5 cells (2 of them after the 1 cell they depend on), 0 already in the ledger, "
            "3 to run now") in out, out
    assert "5 cells ran, 0 were already done, 0 failed" in out, out
    demo_files = set(_ledger_files(results, "demo"))
    assert demo_cells < demo_files and len(demo_files) == 5
    print(f"experiment job: {time.time() - t0:.0f}s")

    # 2. a sweep in the background, followed, stopped once one of its cells has landed
    t0 = time.time()
    sweep, sweep_cells = _cells_of(head.code("sweep"))
    assert len(sweep_cells) >= 3
    rc, out = head.run("sweep")
    assert rc == 0 and "smn-sweep-1" in out, out
    follow = head.run("follow", background=True)
    deadline = time.time() + 400
    while not _ledger_files(results, sweep):
        assert time.time() < deadline, "no sweep cell landed in time"
        assert follow.poll() is None, follow.stdout.read()
        time.sleep(0.5)
    rc, out = head.run("status-stop", timeout=120)
    assert rc == 0, out
    assert re.search(r"smn-sweep-1.*RUNNING", out), out
    followed, _ = follow.communicate(timeout=120)  # following ends with the job
    assert f"sweep {sweep}:" in followed, followed
    rc, out = head.ray("job", "status", "--address", f"http://127.0.0.1:{head.dash_port}", "smn-sweep-1")
    assert re.search(r"was stopped|STOPPED", out), out
    time.sleep(5)  # the stopped driver's cells are killed with it; nothing may land after this
    landed = _ledger_files(results, sweep)
    assert 1 <= len(landed) < len(sweep_cells), "the job finished before it could be stopped"
    print(f"sweep job until stopped: {time.time() - t0:.0f}s, {len(landed)}/{len(sweep_cells)} cells landed")

    # 3. the same submit again: only the missing cells run, finished ones are untouched
    t0 = time.time()
    rc, out = head.run("resume")
    assert rc == 0, out
    missing = len(sweep_cells) - len(landed)
    assert f"{len(sweep_cells)} cells, {len(landed)} already in the ledger, {missing} to run now" in out, out
    done = f"{len(landed)} {'was' if len(landed) == 1 else 'were'} already done"
    assert f"{missing} cell{'s' if missing > 1 else ''} ran, {done}, 0 failed" in out, out
    after = _ledger_files(results, sweep)
    assert set(after) == sweep_cells
    assert {c: after[c] for c in landed} == landed  # not rewritten
    # each cell's rows name the job it ran in (docs/ledger.md): the stopped job's cells its submission id
    import pyarrow.parquet as pq

    jobs = {c: pq.read_table(Path(results) / sweep / "ledger" / f"{c}.parquet",
                             columns=["ray_job_id", "ray_submission_id"]).to_pylist()[0] for c in after}
    assert all(j["ray_job_id"] and j["ray_submission_id"] for j in jobs.values()), jobs
    assert {jobs[c]["ray_submission_id"] for c in landed} == {"smn-sweep-1"}, jobs
    assert len({jobs[c]["ray_job_id"] for c in after}) == 2, jobs  # the stopped job and the resumed one
    df = ledger.read_ledger(results, sweep)
    assert not df.duplicated(["cell_id", "metric"]).any()
    print(f"resumed sweep job: {time.time() - t0:.0f}s")

    # 4. the cascade
    t0 = time.time()
    rc, out = head.run("cascade")
    assert rc == 0, out
    cascade = ledger.read_ledger(results, "table3_small")
    assert not cascade.empty and not cascade.duplicated(["cell_id", "metric"]).any()
    print(f"cascade job: {time.time() - t0:.0f}s")

    # 5. the table, from the ledger on the shared storage
    rc, out = head.run("table")
    assert rc == 0, out
    knn = ledger.read_ledger(results, "demo").query("method == 'pretrained' and metric == 'knn_top1'")["value"]
    assert f"{knn.iloc[0]:.3f}" in out, out
