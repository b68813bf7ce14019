"""The container deployment: Dockerfile, docker-compose.yml, deploy/ and .dockerignore.

No Docker engine is needed. The compose file is parsed and cross-checked against the
Dockerfile, the base config (loaded with the real loader) and the sample data, and the
sidecar's bootstrap script is run for real against the real CLI, with only the final
`sealedsum sidecar` replaced by a stub that records its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import pytest
import yaml  # PyYAML: a test-only dependency

from sealedsum.common import config as config_mod
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.topology import ROLES, Permissions, role_permissions
from sealedsum.producers.inputs import read_records
from sealedsum.accounts import check_password_hash, default_user, vhost_of
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.platform.emulated import EmulatedPlatform

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT_SCRIPT = REPO / "deploy" / "sidecar-entrypoint.sh"
BASE_CONFIG = REPO / "deploy" / "sealedsum.toml"
RABBITMQ_CONF = REPO / "deploy" / "rabbitmq.conf"
DEFINITIONS = REPO / "deploy" / "definitions.json"
APP_SERVICES = ("sidecar", "producer", "consumer")
CLIENTS = ("producer", "consumer")
# Where the entrypoint script reads the base config and writes the client config, by default.
CONTAINER_BASE_CONFIG = "/etc/sealedsum/sealedsum.toml"
CONTAINER_CLIENT_CONFIG = "/shared/client.toml"


# --- helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE_FILE.is_file(), "docker-compose.yml is missing at the repository root"
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no services mapping"
    return doc


def service(compose: dict, name: str) -> dict:
    assert name in compose["services"], f"service {name!r} is missing"
    svc = compose["services"][name]
    assert isinstance(svc, dict), f"service {name!r} is not a mapping"
    return svc


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: v for k, v in env.items()}


def mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each entry of a service's volumes (short or long syntax)."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((v.get("source", ""), v["target"], bool(v.get("read_only", False))))
            continue
        parts = v.split(":")
        assert len(parts) in (2, 3), f"volume entry {v!r} is not SOURCE:TARGET[:MODE]"
        mode = parts[2].split(",") if len(parts) == 3 else []
        out.append((parts[0], parts[1], "ro" in mode))
    return out


def mount_at(svc: dict, target: str) -> tuple[str, bool]:
    found = [(s, ro) for s, t, ro in mounts(svc) if PurePosixPath(t) == PurePosixPath(target)]
    assert len(found) == 1, f"expected exactly one mount at {target}, found {found}"
    return found[0]


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def as_argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else list(value)


def shell_script(svc: dict) -> str:
    """The script a client service runs: entrypoint ["/bin/sh", "-c"] plus one command string."""
    entrypoint, command = as_argv(svc.get("entrypoint")), as_argv(svc.get("command"))
    assert entrypoint in (["/bin/sh", "-c"], ["sh", "-c"], ["/bin/bash", "-c"], ["bash", "-c"]), (
        f"expected a shell entrypoint for the wait loop, got {entrypoint}")
    assert len(command) == 1, "the command should be one shell script"
    return command[0]


def sealedsum_call(script: str, subcommand: str) -> list[str]:
    """The argv of the `sealedsum SUBCOMMAND ...` line in a shell script."""
    calls = []
    for line in script.splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:1] == ["exec"]:
            argv = argv[1:]
        if argv[:2] == ["sealedsum", subcommand]:
            calls.append(argv)
    assert len(calls) == 1, f"expected one `sealedsum {subcommand}` line in:\n{script}"
    return calls[0]


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} must be given exactly once in {argv}"
    return argv[argv.index(name) + 1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), "Dockerfile is missing at the repository root"
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def copied_to(target: str) -> list[str]:
    """Sources the Dockerfile COPYs to exactly ``target``."""
    sources = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            if args[-1] == target:
                sources += args[:-1]
    return sources


# --- docker-compose.yml -------------------------------------------------------------------

def test_compose_defines_the_four_services(compose):
    assert {"rabbitmq", "sidecar", "producer", "consumer"} <= set(compose["services"])


def test_rabbitmq_is_the_official_management_image_with_a_ping_healthcheck(compose):
    rabbit = service(compose, "rabbitmq")
    assert rabbit.get("image") == "rabbitmq:3.13-management"
    assert "build" not in rabbit
    test = as_argv(rabbit.get("healthcheck", {}).get("test"))
    assert test[:1] in (["CMD"], ["CMD-SHELL"]), f"healthcheck test {test} is not CMD or CMD-SHELL"
    command = " ".join(test[1:])
    assert "rabbitmq-diagnostics" in command and "ping" in command, command


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_builds_from_the_repository_dockerfile(compose, name):
    build = service(compose, name).get("build")
    assert build is not None, f"{name} does not build an image"
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    assert context == REPO, f"{name} builds from {context}, not the repository root"
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_talks_to_the_rabbitmq_service(compose, name):
    url = environment(service(compose, name)).get("AMQP_URL")
    assert url, f"{name} does not set AMQP_URL"
    assert "$" not in url, "AMQP_URL should not depend on compose variable interpolation"
    assert urlsplit(url).scheme in ("amqp", "amqps") and urlsplit(url).hostname == "rabbitmq", url
    # The loader accepts it, and it overrides broker.url.
    assert config_mod.from_mapping({}, env={"AMQP_URL": url}).broker.url == url


def rabbitmq_settings(path: Path) -> dict[str, str]:
    """key = value lines of a rabbitmq.conf (sysctl format), comments dropped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not key = value: {line!r}"
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def definitions(compose) -> dict:
    """The definitions file the rabbitmq service loads at boot, found through its mounts."""
    rabbit = service(compose, "rabbitmq")
    confs = [(s, t, ro) for s, t, ro in mounts(rabbit)
             if PurePosixPath(t).parent == PurePosixPath("/etc/rabbitmq/conf.d")
             or PurePosixPath(t) == PurePosixPath("/etc/rabbitmq/rabbitmq.conf")]
    assert len(confs) == 1, f"expected one mounted rabbitmq.conf, found {confs}"
    source, target, read_only = confs[0]
    assert is_bind(source) and read_only and target.endswith(".conf")
    assert (COMPOSE_FILE.parent / source).resolve() == RABBITMQ_CONF
    settings = rabbitmq_settings(RABBITMQ_CONF)
    assert "load_definitions" in settings, "the broker would not load the accounts at boot"
    source, read_only = mount_at(rabbit, settings["load_definitions"])
    assert is_bind(source) and read_only
    assert (COMPOSE_FILE.parent / source).resolve() == DEFINITIONS
    return json.loads(DEFINITIONS.read_text())


def test_rabbitmq_loads_the_accounts_and_keeps_guest_for_the_host(definitions):
    users = {u["name"]: u for u in definitions["users"]}
    topology = config_mod.load(BASE_CONFIG, env={}).broker.topology
    assert set(users) == {default_user(topology, r) for r in ROLES} | {"guest"}
    # A broker that loads definitions creates neither its default vhost nor guest: the
    # file must, or the README's tests and the management UI lose their login.
    assert {"name": "/"} in definitions["vhosts"]
    assert users["guest"]["tags"] == ["administrator"]
    assert check_password_hash("guest", users["guest"]["password_hash"])
    for u in users.values():
        assert u["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert {p["user"] for p in definitions["permissions"]} == set(users)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_connects_as_its_own_least_privilege_user(compose, definitions, name):
    url = urlsplit(environment(service(compose, name))["AMQP_URL"])
    user, password = unquote(url.username or ""), unquote(url.password or "")
    topology = config_mod.load(BASE_CONFIG, env={}).broker.topology
    assert user == default_user(topology, name), f"{name} connects as {user!r}"
    (entry,) = [u for u in definitions["users"] if u["name"] == user]
    assert entry["tags"] == [], f"{user} must have no tags"
    assert check_password_hash(password, entry["password_hash"]), f"{name}'s password is not {user}'s"
    vhost = vhost_of(url.geturl())
    (perm,) = [p for p in definitions["permissions"] if p["user"] == user]
    assert perm["vhost"] == vhost
    granted = Permissions(perm["configure"], perm["write"], perm["read"])
    assert granted == role_permissions(topology)[name], f"{user} has other permissions than its role's"


def test_app_services_use_three_different_users_none_of_them_guest(compose):
    users = [urlsplit(environment(service(compose, name))["AMQP_URL"]).username for name in APP_SERVICES]
    assert len(set(users)) == len(APP_SERVICES) and "guest" not in users, users


def test_consumer_named_queue_is_one_the_consumer_account_may_use(compose):
    argv = sealedsum_call(shell_script(service(compose, "consumer")), "consume")
    if "--queue" in argv:
        queue = option(argv, "--queue")
        p = role_permissions(config_mod.load(BASE_CONFIG, env={}).broker.topology)["consumer"]
        # configure to declare it, write to bind it, read to consume it (RabbitMQ's regexes are PCRE;
        # Python's re reads these the same way).
        assert all(re.search(pattern, queue) for pattern in p.as_tuple()), queue


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_waits_for_a_healthy_broker(compose, name):
    depends = service(compose, name).get("depends_on")
    assert isinstance(depends, dict), f"{name}: depends_on must be the long form, with conditions"
    assert depends.get("rabbitmq", {}).get("condition") == "service_healthy"


def test_sidecar_keeps_its_state_in_a_named_volume(compose):
    sidecar = service(compose, "sidecar")
    source, read_only = mount_at(sidecar, "/state")
    assert not is_bind(source) and source in (compose.get("volumes") or {}), (
        f"/state should be a named volume declared at the top level, not {source!r}")
    assert not read_only


def test_clients_share_the_volume_the_sidecar_writes_the_client_config_to(compose):
    shared_dir = str(PurePosixPath(CONTAINER_CLIENT_CONFIG).parent)
    source, read_only = mount_at(service(compose, "sidecar"), shared_dir)
    assert not is_bind(source) and source in (compose.get("volumes") or {})
    assert not read_only, "the sidecar writes the client config there"
    for name in CLIENTS:
        assert mount_at(service(compose, name), shared_dir)[0] == source, f"{name} does not mount {source}"
        assert source != mount_at(service(compose, "sidecar"), "/state")[0], "the platform key must not be shared"


def test_sidecar_runs_the_bootstrap_script_that_the_image_ships(compose):
    entrypoint = as_argv(service(compose, "sidecar").get("entrypoint"))
    assert entrypoint, "the sidecar must run the bootstrap script as its entrypoint"
    sources = copied_to(entrypoint[0])
    assert sources and all((REPO / s).resolve() == ENTRYPOINT_SCRIPT for s in sources), (
        f"the Dockerfile does not COPY deploy/sidecar-entrypoint.sh to {entrypoint[0]}")


def test_base_config_mounted_into_the_sidecar_loads_and_has_no_trust_table(compose):
    source, _ = mount_at(service(compose, "sidecar"), CONTAINER_BASE_CONFIG)
    assert is_bind(source)
    path = (COMPOSE_FILE.parent / source).resolve()
    assert path == BASE_CONFIG
    cfg = config_mod.load(path, env={})
    assert cfg.trust is None, "the entrypoint appends [trust]; a second one would not be valid TOML"
    policy = cfg.require_policy()
    assert policy.streams, "the base config defines no stream"
    assert cfg.broker.topology.prefix
    assert policy.paillier_bits >= 3072 and not policy.insecure_test_keys


@pytest.mark.parametrize("name", CLIENTS)
def test_client_waits_for_the_client_config_then_uses_it_on_a_configured_stream(compose, name):
    script = shell_script(service(compose, name))
    subprocess.run(["bash", "-n", "-c", script], check=True)
    assert re.search(r"until \[ -[fs] " + re.escape(CONTAINER_CLIENT_CONFIG) + r" \]", script), (
        f"{name} does not wait for {CONTAINER_CLIENT_CONFIG}")
    subcommand = {"producer": "produce", "consumer": "consume"}[name]
    argv = sealedsum_call(script, subcommand)
    assert option(argv, "--config") == CONTAINER_CLIENT_CONFIG
    stream = option(argv, "--stream")
    policy = config_mod.load(BASE_CONFIG, env={}).require_policy()
    assert stream in policy.streams, f"{name} uses stream {stream!r}, which deploy/sealedsum.toml does not define"
    if name == "consumer":
        assert "--json" in argv


def test_producer_input_is_the_shipped_sample_and_fits_the_stream(compose):
    producer = service(compose, "producer")
    argv = sealedsum_call(shell_script(producer), "produce")
    source, read_only = mount_at(producer, option(argv, "--input"))
    sample = (COMPOSE_FILE.parent / source).resolve()
    assert sample == REPO / "deploy" / "sample.csv" and read_only
    stream = config_mod.load(BASE_CONFIG, env={}).require_policy().streams[option(argv, "--stream")]
    with sample.open(encoding="utf-8") as f:
        lines = list(read_records(f))
    bad = [(line.number, line.error) for line in lines if line.values is None]
    assert not bad, f"sample lines the producer would reject: {bad}"
    assert all(len(line.values) == stream.dimension for line in lines)
    assert len(lines) >= stream.min_batch, "the sample is too small for any window to be released"


def test_volumes_used_by_services_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for source, _, _ in mounts(svc):
            assert is_bind(source) or source in declared, f"{name} uses undeclared volume {source!r}"


# --- the clustered profile ----------------------------------------------------------------

CLUSTER_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
CLUSTER_CONF = REPO / "deploy" / "rabbitmq-cluster.conf"
CLUSTER_PLUGINS = REPO / "deploy" / "cluster-enabled-plugins"
CLUSTER_SCRIPT = REPO / "deploy" / "cluster.sh"


def test_the_default_services_have_no_profile_and_the_cluster_nodes_only_the_clustered_one(compose):
    for name in ("rabbitmq", *APP_SERVICES):
        assert not service(compose, name).get("profiles"), f"{name} must start without --profile"
    for name in CLUSTER_NODES:
        assert service(compose, name).get("profiles") == ["clustered"], name
    clustered = {n for n, svc in compose["services"].items() if "clustered" in (svc.get("profiles") or [])}
    assert clustered == set(CLUSTER_NODES)


def test_cluster_nodes_run_the_broker_image_with_one_cookie_distinct_names_ports_and_volumes(compose):
    image = service(compose, "rabbitmq")["image"]
    cookies, hostnames, ports, data = set(), [], [], []
    for name in CLUSTER_NODES:
        svc = service(compose, name)
        assert svc.get("image") == image and "build" not in svc, name
        cookie = environment(svc).get("RABBITMQ_ERLANG_COOKIE")
        assert cookie, f"{name} has no RABBITMQ_ERLANG_COOKIE: the nodes could not talk to each other"
        cookies.add(cookie)
        hostnames.append(svc.get("hostname"))
        (port,) = svc.get("ports")
        host_ip, host_port, container_port = str(port).split(":")
        assert host_ip == "127.0.0.1" and container_port == "5672", port
        ports.append(int(host_port))
        data.append(mount_at(svc, "/var/lib/rabbitmq")[0])
        test = as_argv(svc.get("healthcheck", {}).get("test"))
        assert "rabbitmq-diagnostics" in test and "ping" in test, test
    assert len(cookies) == 1, "the three nodes must share one Erlang cookie"
    assert hostnames == list(CLUSTER_NODES), "a node's name (rabbit@HOSTNAME) must stay fixed"
    # The ports deploy/cluster.sh uses, so SEALEDSUM_CLUSTER_URLS is the same for either.
    assert ports == [5681, 5682, 5683]
    assert re.search(r'AMQP_PORTS:-5681 5682 5683', CLUSTER_SCRIPT.read_text())
    assert len(set(data)) == 3 and not any(is_bind(d) for d in data)
    assert set(data) <= set(compose.get("volumes") or {})
    assert service(compose, "rabbitmq").get("ports")[0].split(":")[1] == "5672"


@pytest.mark.parametrize("name", CLUSTER_NODES)
def test_cluster_node_mounts_existing_files_read_only(compose, name):
    svc = service(compose, name)
    wanted = {"/etc/rabbitmq/conf.d/91-sealedsum-cluster.conf": CLUSTER_CONF,
              "/etc/rabbitmq/enabled_plugins": CLUSTER_PLUGINS,
              "/etc/rabbitmq/conf.d/90-sealedsum.conf": RABBITMQ_CONF,
              "/etc/rabbitmq/definitions.json": DEFINITIONS}
    for target, path in wanted.items():
        source, read_only = mount_at(svc, target)
        assert is_bind(source) and read_only, (name, target)
        assert (COMPOSE_FILE.parent / source).resolve() == path and path.is_file(), (name, source)
    for source, target, _ in mounts(svc):
        if is_bind(source):
            assert (COMPOSE_FILE.parent / source).exists(), f"{name} mounts {source}, which does not exist"


def test_cluster_config_lists_exactly_the_three_nodes_for_classic_peer_discovery(compose):
    settings = rabbitmq_settings(CLUSTER_CONF)
    assert settings["cluster_formation.peer_discovery_backend"] in ("classic_config", "rabbit_peer_discovery_classic_config")
    listed = {v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{service(compose, n)['hostname']}" for n in CLUSTER_NODES}


def test_cluster_nodes_enable_the_consistent_hash_exchange():
    text = CLUSTER_PLUGINS.read_text().strip()
    m = re.fullmatch(r"\[([a-z_,\s]*)\]\.", text)
    assert m, f"{CLUSTER_PLUGINS} is not an Erlang list term: {text!r}"
    plugins = {p.strip() for p in m.group(1).split(",") if p.strip()}
    assert "rabbitmq_consistent_hash_exchange" in plugins
    assert "rabbitmq_management" in plugins, "the -management image's own plugin must stay enabled"


def test_cluster_script_is_executable_and_parses():
    assert CLUSTER_SCRIPT.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(CLUSTER_SCRIPT)], check=True)


# --- Dockerfile and .dockerignore -----------------------------------------------------------

def test_dockerfile_installs_the_project_and_runs_sealedsum_as_a_non_root_user():
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim"
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert re.search(r"pip install (--[\w-]+ )*\.(\s|$)", runs), "the Dockerfile does not `pip install .`"
    entrypoints = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["sealedsum"]
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # The image must carry every file pyproject.toml needs to install.
    copied = " ".join(rest for kw, rest in instructions if kw == "COPY")
    for needed in ("pyproject.toml", "README.md", "common", "sidecar", "producers", "consumers", "sealedsum"):
        assert re.search(rf"(^|\s){needed}(\s|/|$)", copied), f"the Dockerfile does not COPY {needed}"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    path = REPO / ".dockerignore"
    assert path.is_file()
    patterns = {line.strip().strip("/") for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".venv", ".git", "state"):
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    assert any("__pycache__" in p for p in patterns)
    for kept in ("README.md", "deploy", "pyproject.toml"):
        assert kept not in patterns, f".dockerignore excludes {kept}, which the build needs"


# --- the sidecar's bootstrap script ---------------------------------------------------------

def test_entrypoint_script_is_executable_and_parses():
    assert ENTRYPOINT_SCRIPT.is_file()
    assert ENTRYPOINT_SCRIPT.stat().st_mode & stat.S_IXUSR and os.access(ENTRYPOINT_SCRIPT, os.X_OK)
    assert ENTRYPOINT_SCRIPT.read_text().startswith("#!/bin/sh"), "the slim image has /bin/sh"
    subprocess.run(["bash", "-n", str(ENTRYPOINT_SCRIPT)], check=True)
    if shutil.which("dash"):
        subprocess.run(["dash", "-n", str(ENTRYPOINT_SCRIPT)], check=True)


@pytest.fixture
def bootstrap(tmp_path):
    """Run the entrypoint script with temporary paths; `sealedsum sidecar` is a stub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sidecar_args = tmp_path / "sidecar-args.json"
    stub = bin_dir / "sealedsum"
    stub.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = sidecar ]; then\n'
        f'  exec {shlex.quote(sys.executable)} -c \'import json, sys; '
        f'open(sys.argv[1], "w").write(json.dumps(sys.argv[2:]))\' {shlex.quote(str(sidecar_args))} "$@"\n'
        "fi\n"
        f'exec {shlex.quote(sys.executable)} -m sealedsum "$@"\n'
    )
    stub.chmod(0o755)
    paths = {"base": tmp_path / "etc" / "sealedsum.toml", "state": tmp_path / "state",
             "client": tmp_path / "shared" / "client.toml", "sidecar_args": sidecar_args}
    paths["base"].parent.mkdir()
    shutil.copy(BASE_CONFIG, paths["base"])
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SEALEDSUM_BASE_CONFIG=str(paths["base"]), SEALEDSUM_STATE=str(paths["state"]),
               SEALEDSUM_CLIENT_CONFIG=str(paths["client"]))
    env.pop("SEALEDSUM_CONFIG", None)
    env.pop("AMQP_URL", None)

    def run(*extra: str) -> subprocess.CompletedProcess:
        sidecar_args.unlink(missing_ok=True)
        return subprocess.run(["sh", str(ENTRYPOINT_SCRIPT), *extra], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    return run, paths


def test_bootstrap_writes_a_client_config_that_pins_this_platform_and_measurement(bootstrap):
    run, paths = bootstrap
    result = run("--log-level", "debug")
    assert result.returncode == 0, result.stderr

    platform = EmulatedPlatform.load(paths["state"])
    client = config_mod.load(paths["client"], env={})
    base = config_mod.load(paths["base"], env={})
    trust = client.require_trust()
    assert trust.platform_key == platform.public_key()
    _, expected = measure.measure(base.require_policy().to_bytes())
    assert trust.measurements == frozenset({expected})
    # Everything else is the base config, unchanged.
    assert client.require_policy().to_bytes() == base.require_policy().to_bytes()
    assert client.broker.url == base.broker.url and client.broker.topology == base.broker.topology
    assert not list(paths["client"].parent.glob("client.toml.*")), "a temporary file was left behind"
    # Then it hands over to the sidecar, with the base config, the state and extra arguments.
    args = json.loads(paths["sidecar_args"].read_text())
    assert args[0] == "sidecar"
    assert option(args, "--config") == str(paths["base"])
    assert option(args, "--state") == str(paths["state"])
    assert args[-2:] == ["--log-level", "debug"]


def test_bootstrap_keeps_the_platform_key_across_restarts_and_replaces_a_stale_client_config(bootstrap):
    run, paths = bootstrap
    assert run().returncode == 0
    key_file = paths["state"] / "platform.key"
    first_key = key_file.read_bytes()
    paths["client"].write_text("# stale: an old measurement from an earlier image\n[trust]\n")

    result = run()
    assert result.returncode == 0, result.stderr
    assert key_file.read_bytes() == first_key, "a restart must not create a new platform key"
    trust = config_mod.load(paths["client"], env={}).require_trust()
    assert encode_platform_key(trust.platform_key) == encode_platform_key(
        EmulatedPlatform.load(paths["state"]).public_key())


def test_bootstrap_refuses_a_base_config_that_already_has_trust_and_starts_nothing(bootstrap):
    run, paths = bootstrap
    with paths["base"].open("a") as f:
        f.write('\n[trust]\nplatform_key = "x"\n')
    result = run()
    assert result.returncode != 0
    assert "[trust]" in result.stderr
    assert not paths["client"].exists()
    assert not paths["sidecar_args"].exists(), "the sidecar must not start"
