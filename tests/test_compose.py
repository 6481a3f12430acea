"""docker-compose.yml and scripts/slurm_tune.sh (docs/scale-out.md) run real mpprop commands.

Neither Docker nor Slurm runs here: the files are parsed, and every `mpprop` invocation in
them is checked against the click group `mpprop.cli.main` (subcommand, options, their
values where literal, `-S` overrides validated by load_params), the `mlflow server` options
against MLflow's own click command, and the wiring (one PostgreSQL study, one MLflow server,
the graph cache in a volume that prepare fills before the tuners start) against params.yaml.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml
from conftest import REPO

from mpprop.cli import main as mpprop_cli
from mpprop.config import load_params
from mpprop.settings import ConfigError

COMPOSE_FILE = REPO / "docker-compose.yml"
SLURM_SCRIPT = REPO / "scripts" / "slurm_tune.sh"
PARAMS_FILE = REPO / "params.yaml"
PARAMS = yaml.safe_load(PARAMS_FILE.read_text())
# where the mounted folder (params.yaml, data/, tuned/) lies in the image (Dockerfile WORKDIR)
WORKDIR = PurePosixPath("/work")
# words before a command that still run it: shell keywords, launchers
SHELL_PREFIXES = {"then", "else", "do", "!", "{", "exec", "srun", "time"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# ----------------------------------------------------------------------------- helpers


def interpolate(text: str) -> str:
    """Compose's variable substitution with nothing set: ${VAR:-default} -> default,
    ${VAR} -> '', $$ -> $."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(2) or ""

    return re.sub(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}", sub, text)


def image_entrypoint() -> list[str]:
    """ENTRYPOINT of the repository's Dockerfile (exec form)."""
    lines = [ln for ln in (REPO / "Dockerfile").read_text().splitlines()
             if ln.startswith("ENTRYPOINT")]
    assert len(lines) == 1, "the Dockerfile must have one ENTRYPOINT"
    return json.loads(lines[0].split(None, 1)[1])


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: comments dropped, backslash continuations
    joined, split at newlines, ;, &&, ||, | and &."""
    commands: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in lexer:
            if token and set(token) <= set(";&|"):
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    return [c for c in commands if c]


def mpprop_argv(words: list[str]) -> list[str] | None:
    """The arguments after `mpprop` when a simple command runs mpprop (directly, after a
    shell keyword, through `srun` or `exec`, by a path such as .venv/bin/mpprop), else None."""
    while words and (words[0] in SHELL_PREFIXES or re.fullmatch(r"\w+=\S*", words[0])):
        words = words[1:]
    if words and PurePosixPath(words[0]).name == "mpprop":
        return words[1:]
    return None


def option_table(command: click.Command) -> dict[str, click.Option]:
    return {name: p for p in command.params if isinstance(p, click.Option)
            for name in (*p.opts, *p.secondary_opts)}


def parse_options(command: click.Command, args: list[str], where: str,
                  stop_at_positional: bool) -> tuple[dict[str, list[str | None]], list[str]]:
    """Options of `command` at the head of `args` (all of them, unless stop_at_positional):
    {param name: [values]} and the rest. Every option must be one of the command's; its
    value, where literal, must convert with the option's type."""
    table = option_table(command)
    found: dict[str, list[str | None]] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-") or token == "-":
            if stop_at_positional:
                break
            has_arguments = any(isinstance(p, click.Argument) for p in command.params)
            assert has_arguments, f"{where}: unexpected argument {token!r}"
            i += 1
            continue
        name, eq, inline = token.partition("=")
        assert name in table, (
            f"{where}: no option {name!r}; `{command.name}` has {sorted(table)}")
        param = table[name]
        if param.is_flag or param.count:
            assert not eq, f"{where}: {name} is a flag, it takes no value"
            value = None
            i += 1
        elif eq:
            value = inline
            i += 1
        else:
            assert i + 1 < len(args), f"{where}: {name} needs a value"
            value = args[i + 1]
            i += 2
        if value is not None and "$" not in value:
            try:
                param.type.convert(value, param, None)
            except click.BadParameter as exc:
                raise AssertionError(f"{where}: {name} {value!r}: {exc.message}") from None
        found.setdefault(param.name, []).append(value)
    return found, args[i:]


def check_override(item: str, where: str) -> None:
    """A -S override: section.key=value with a key that params.yaml has; a literal value must
    pass load_params's validation."""
    key, eq, value = item.partition("=")
    assert eq, f"{where}: -S {item!r} must look like section.key=value"
    node: Any = PARAMS
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"{where}: params.yaml has no key {key!r}"
        node = node[part]
    if "$" not in value:
        try:
            load_params(PARAMS_FILE, [item])
        except ConfigError as exc:
            raise AssertionError(f"{where}: -S {item!r}: {exc}") from None


def check_invocation(args: list[str], where: str) -> tuple[str, dict[str, list[str | None]],
                                                           list[str]]:
    """`mpprop ARGS` must parse: group options, a real subcommand, its real options, its
    required options given. Returns (subcommand, {option: [values]}, -S overrides)."""
    group_opts, rest = parse_options(mpprop_cli, args, where, stop_at_positional=True)
    assert rest, f"{where}: `mpprop` without a subcommand"
    name, sub_args = rest[0], rest[1:]
    assert name in mpprop_cli.commands, (
        f"{where}: {name!r} is not an mpprop command; they are {sorted(mpprop_cli.commands)}")
    command = mpprop_cli.commands[name]
    where = f"{where}: mpprop {name}"
    opts, _ = parse_options(command, sub_args, where, stop_at_positional=False)
    for p in command.params:
        assert not p.required or p.name in opts, f"{where}: required {p.opts[0]} missing"
    overrides = [v for v in group_opts.get("overrides", []) if v is not None]
    for item in overrides:
        check_override(item, where)
    return name, opts, overrides


def override_value(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return values[-1] if values else None


# ---- compose


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def mpprop_image_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the image built from the repository's Dockerfile."""
    built = {s.get("image") for s in compose["services"].values() if s.get("build")}
    return {name: s for name, s in compose["services"].items()
            if s.get("build") or (s.get("image") and s.get("image") in built)}


def service_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: an entrypoint of the service replaces the image's and its
    CMD; the image's is ENTRYPOINT ["mpprop"]."""
    if "entrypoint" in service:
        argv = as_list(service["entrypoint"]) + as_list(service.get("command"))
    else:
        argv = image_entrypoint() + as_list(service.get("command"))
    return [interpolate(a) for a in argv]


def service_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The mpprop argument lists a service runs (exec form, or inside `sh -c SCRIPT`)."""
    argv = service_argv(service)
    if argv and PurePosixPath(argv[0]).name == "mpprop":
        return [argv[1:]]
    if len(argv) >= 3 and PurePosixPath(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        return [a for c in shell_commands(argv[2]) if (a := mpprop_argv(c)) is not None]
    return []


def check_compose_commands(compose: dict[str, Any]) -> dict[str, list[tuple]]:
    """Every mpprop invocation of every service of the mpprop image, checked; per service."""
    out = {}
    for name, service in mpprop_image_services(compose).items():
        out[name] = [check_invocation(args, f"docker-compose.yml service {name}")
                     for args in service_invocations(service)]
    return out


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) of a service's volumes: kind 'volume' (named) or 'bind'."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            source, target = interpolate(str(v.get("source", ""))), v["target"]
            kind = "volume" if v.get("type", "volume") == "volume" else "bind"
        else:
            parts = interpolate(v).split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append((kind, source, target))
    return out


def volume_at(service: dict[str, Any], path: PurePosixPath) -> tuple[str, str] | None:
    """The named volume (name, its mount target) that holds `path` in the service."""
    best = None
    for kind, source, target in mounts(service):
        t = PurePosixPath(target)
        if kind == "volume" and source and (path == t or t in path.parents):
            if best is None or len(str(t)) > len(best[1]):
                best = (source, str(t))
    return best


def options_of(argv: list[str], command: click.Command, where: str) -> dict[str, list]:
    opts, _ = parse_options(command, argv, where, stop_at_positional=False)
    return opts


# ---- slurm


def slurm_invocations(text: str) -> list[list[str]]:
    return [a for c in shell_commands(text) if (a := mpprop_argv(c)) is not None]


def check_slurm_commands(text: str) -> list[tuple]:
    invocations = slurm_invocations(text)
    assert invocations, "scripts/slurm_tune.sh runs no `mpprop` / `srun mpprop` command"
    return [check_invocation(a, "scripts/slurm_tune.sh") for a in invocations]


def shell_default(text: str, var: str) -> str:
    """The default of VAR=${VAR:-default} in a script."""
    m = re.search(rf"^{var}=\$\{{{var}:-(.*)\}}\s*$", text, re.MULTILINE)
    assert m, f"scripts/slurm_tune.sh sets no {var}=${{{var}:-...}}"
    return m.group(1)


# ----------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_expected_services(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "prepare", "tuner"} <= set(services)
    pg = services["postgres"]
    image = pg["image"]
    assert image.split(":")[0] == "postgres", "postgres: the official image (docker.io/library)"
    assert pg.get("healthcheck", {}).get("test"), "postgres needs a healthcheck"
    assert "pg_isready" in " ".join(as_list(pg["healthcheck"]["test"]))
    assert volume_at(pg, PurePosixPath("/var/lib/postgresql/data")), \
        "postgres keeps its data in a named volume"
    assert set(mpprop_image_services(compose)) >= {"mlflow", "prepare", "tuner"}


def test_mpprop_image_is_the_repository_dockerfile(compose):
    for name, service in mpprop_image_services(compose).items():
        build = service.get("build")
        assert build, f"{name}: builds the mpprop image (build: .), so `compose build` makes it"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (REPO / context).resolve() == REPO, f"{name}: build context is the repo root"
        assert (REPO / context / dockerfile).is_file()
    assert image_entrypoint() == ["mpprop"]


def test_mpprop_commands_are_real(compose):
    found = check_compose_commands(compose)
    assert [c[0] for c in found["prepare"]] == ["fetch", "featurize", "split"]
    assert [c[0] for c in found["tuner"]] == ["tune"]


def test_tuners_share_one_postgres_study_and_one_mlflow_server(compose):
    services = compose["services"]
    ((_, opts, overrides),) = check_compose_commands(compose)["tuner"]
    storage = urlparse(opts["storage"][0])
    assert storage.scheme in ("postgresql", "postgresql+psycopg2"), storage.scheme
    assert storage.hostname == "postgres" and storage.hostname in services
    pg_env = services["postgres"]["environment"]
    assert storage.username == pg_env["POSTGRES_USER"]
    assert storage.password == interpolate(pg_env["POSTGRES_PASSWORD"])
    assert storage.path.lstrip("/") == pg_env["POSTGRES_DB"]

    uri = override_value(overrides, "mlflow.tracking_uri")
    assert uri, "the tuner sets -S mlflow.tracking_uri (MLFLOW_TRACKING_URI is not read " \
                "when a params.yaml is there)"
    tracking = urlparse(uri)
    assert tracking.scheme == "http" and tracking.hostname == "mlflow"
    server = mlflow_server_options(compose)
    assert str(tracking.port) == server["port"][0]
    # and the server answers that Host header (MLflow's DNS-rebinding guard)
    from mlflow.server.security_utils import is_allowed_host_header
    allowed = [h.strip() for h in server["allowed_hosts"][0].split(",")]
    assert is_allowed_host_header(allowed, tracking.netloc)
    assert is_allowed_host_header(allowed, f"localhost:{tracking.port}")  # the UI

    # scalable: `--scale tuner=N` needs no fixed name and no published port
    tuner = services["tuner"]
    assert "container_name" not in tuner and "ports" not in tuner and "hostname" not in tuner
    # one thread per worker unless TUNER_THREADS says otherwise
    assert override_value(overrides, "train.torch_threads") == "1"


def mlflow_server_options(compose: dict[str, Any]) -> dict[str, list]:
    from mlflow.cli import server

    argv = service_argv(compose["services"]["mlflow"])
    assert argv[:2] == ["mlflow", "server"], argv[:2]
    return options_of(argv[2:], server, "docker-compose.yml service mlflow: mlflow server")


def test_mlflow_server_postgres_backend_and_served_artifacts(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    opts = mlflow_server_options(compose)
    backend = urlparse(opts["backend_store_uri"][0])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    db = backend.path.lstrip("/")
    # the database exists: POSTGRES_DB or made by an init script of the postgres service
    pg = services["postgres"]
    init_sql = " ".join(compose.get("configs", {}).get(c["source"], {}).get("content", "")
                        for c in pg.get("configs", []) if isinstance(c, dict))
    assert db == pg["environment"]["POSTGRES_DB"] or f"CREATE DATABASE {db}" in init_sql
    assert any(str(c.get("target", "")).startswith("/docker-entrypoint-initdb.d/")
               for c in pg.get("configs", []) if isinstance(c, dict))
    assert db != pg["environment"]["POSTGRES_DB"], "MLflow and Optuna need separate databases"
    assert opts.get("serve_artifacts") == [None], "--serve-artifacts"
    destination = PurePosixPath(opts["artifacts_destination"][0])
    assert volume_at(mlflow, destination), "the artifacts lie in a named volume"
    port = opts["port"][0]
    assert any(interpolate(str(p)).endswith(f":{port}") for p in mlflow.get("ports", [])), \
        f"the MLflow port {port} is published (the UI)"
    test = " ".join(as_list(mlflow["healthcheck"]["test"]))
    assert f":{port}/health" in test


def test_graph_cache_is_built_once_in_a_shared_volume(compose):
    services = compose["services"]
    prepare, tuner = services["prepare"], services["tuner"]
    for name in ("prepare", "tuner"):
        s = services[name]
        assert PurePosixPath(s.get("working_dir", str(WORKDIR))) == WORKDIR
        assert any(t == str(WORKDIR / "params.yaml") for _, _, t in mounts(s)), \
            f"{name} mounts params.yaml at {WORKDIR}"
    # what prepare writes and the tuners read: same named volume, same place
    for key in (PARAMS["graph"]["cache_dir"], PARAMS["data"]["snapshot_dir"],
                PARAMS["split"]["dir"]):
        path = WORKDIR / key
        held = volume_at(prepare, path)
        assert held, f"prepare writes {path} into a named volume"
        assert volume_at(tuner, path) == held, f"the tuners read {path} from the same volume"
    assert volume_at(tuner, WORKDIR / PARAMS["tune"]["best_params_dir"]), \
        "tuned/<property>.yaml is kept in a volume"
    # prepare skips the fetch only where the snapshot that featurize reads exists
    script = service_argv(prepare)[2]
    snapshot = f"{PARAMS['data']['snapshot_dir']}/snapshot.json"
    assert f"-f {snapshot}" in script
    # the volumes the mpprop user writes are handed to it (uid 1000) before use
    init = service_argv(services["init-volumes"])
    assert init[:2] == ["chown", "1000:1000"] and services["init-volumes"]["user"] in ("0:0", "root")
    for name in ("mlflow", "prepare", "tuner"):
        for kind, _, target in mounts(services[name]):
            if kind == "volume":
                assert target in init[2:], f"{name}: {target} is not chowned by init-volumes"
                assert volume_at(services["init-volumes"], PurePosixPath(target))


def test_volumes_and_configs_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for kind, source, target in mounts(service):
            if kind == "volume" and source:
                assert source in declared, f"{name}: volume {source!r} is not declared"
                used.add(source)
            assert target.startswith("/"), f"{name}: mount target {target!r}"
        for c in service.get("configs", []):
            source = c["source"] if isinstance(c, dict) else c
            assert source in (compose.get("configs") or {}), f"{name}: config {source!r}"
    assert declared == used, f"declared but unused volumes: {declared - used}"


def test_depends_on(compose):
    services = compose["services"]
    graph = {}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        graph[name] = set(deps)
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name
            condition = spec.get("condition", "service_started")
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {dep}: {condition!r}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is a one-shot"
            assert not set(services[dep].get("profiles", [])) - set(service.get("profiles", [])), \
                f"{name} depends on {dep}, which only starts with a profile"
    # no cycles
    state: dict[str, int] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert state.get(node) != 1, f"depends_on cycle: {' -> '.join(path + (node,))}"
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in graph[node]:
            visit(dep, path + (node,))
        state[node] = 2

    for node in graph:
        visit(node, ())

    tuner = services["tuner"]["depends_on"]
    assert tuner["prepare"]["condition"] == "service_completed_successfully"
    assert tuner["postgres"]["condition"] == "service_healthy"
    assert tuner["mlflow"]["condition"] == "service_healthy"


# ----------------------------------------------------------------------------- slurm


def test_slurm_script_is_valid_bash():
    bash = shutil.which("bash")
    assert bash, "bash is needed"
    result = subprocess.run([bash, "-n", str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_directives():
    lines = SLURM_SCRIPT.read_text().splitlines()
    assert lines[0].startswith("#!")
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, ln in enumerate(lines)
                         if i and ln.strip() and not ln.lstrip().startswith("#"))
    directives = [ln.split(None, 1)[1] for ln in lines[:first_command]
                  if ln.startswith("#SBATCH ")]
    assert not [ln for ln in lines[first_command:] if ln.startswith("#SBATCH")]
    names = {d.split("=", 1)[0] for d in directives}
    assert {"--array", "--cpus-per-task", "--time"} <= names, names
    array = next(d.split("=", 1)[1] for d in directives if d.startswith("--array="))
    assert re.fullmatch(r"\d+-\d+(%\d+)?", array), array


def test_slurm_mpprop_commands_are_real():
    text = SLURM_SCRIPT.read_text()
    found = check_slurm_commands(text)
    tunes = [(opts, overrides) for name, opts, overrides in found if name == "tune"]
    assert len(tunes) == 1
    opts, overrides = tunes[0]
    assert opts["storage"] == ["$OPTUNA_STORAGE"]
    assert shell_default(text, "OPTUNA_STORAGE").startswith("postgresql://")
    assert override_value(overrides, "mlflow.tracking_uri") == "$MLFLOW_URI"
    assert urlparse(shell_default(text, "MLFLOW_URI")).scheme in ("http", "https")
    assert override_value(overrides, "graph.cache_dir") == "$GRAPH_CACHE"
    assert "srun mpprop" in text.replace("\\\n", " ")


# ----------------------------------------------------------------------------- the checks check


@pytest.mark.parametrize("args, words", [
    (["tunes", "--property", "band_gap"], "not an mpprop command"),
    (["tune", "--property", "band_gap", "--n-trial", "3"], "no option '--n-trial'"),
    (["tune", "--storage", "postgresql://x"], "required --property missing"),
    (["-X", "tune", "--property", "band_gap"], "no option '-X'"),
    (["-S", "tune.n_trial=3", "tune", "--property", "band_gap"], "no key 'tune.n_trial'"),
    (["-S", "tune.n_trials=many", "tune", "--property", "band_gap"], "tune.n_trials"),
    (["tune", "--property", "band_gap", "--n-trials", "ten"], "--n-trials"),
    (["fetch", "--source", "ftp"], "--source"),
    (["tune", "--property", "band_gap", "--no-pruning=yes"], "is a flag"),
    (["tune", "--property"], "needs a value"),
    (["split", "band_gap"], "unexpected argument"),
])
def test_checker_rejects_bad_invocations(args, words):
    with pytest.raises(AssertionError, match=re.escape(words)):
        check_invocation(args, "test")


def test_checker_rejects_a_renamed_command_or_option_in_compose(compose):
    renamed = copy.deepcopy(compose)
    renamed["services"]["tuner"]["command"] = [
        "tunes" if a == "tune" else a for a in renamed["services"]["tuner"]["command"]]
    with pytest.raises(AssertionError, match="'tunes' is not an mpprop command"):
        check_compose_commands(renamed)
    renamed = copy.deepcopy(compose)
    cmd = renamed["services"]["prepare"]["command"]
    renamed["services"]["prepare"]["command"] = [cmd[0].replace("mpprop featurize",
                                                                "mpprop featurise")]
    with pytest.raises(AssertionError, match="'featurise' is not an mpprop command"):
        check_compose_commands(renamed)


def test_checker_rejects_a_renamed_option_in_the_slurm_script():
    text = SLURM_SCRIPT.read_text()
    assert "--storage" in text
    with pytest.raises(AssertionError, match="no option '--store'"):
        check_slurm_commands(text.replace("--storage", "--store"))
    with pytest.raises(AssertionError, match="no `mpprop`"):
        check_slurm_commands(text.replace("srun mpprop", "srun true"))
