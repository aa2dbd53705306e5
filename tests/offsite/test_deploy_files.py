"""Static checks of deploy/: no Docker engine here, so the files are validated structurally —
every offsite command they run parses against the real CLI, references resolve, ports agree."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from offsite.cli.main import app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CLI = typer.main.get_command(app)


def _parse_offsite(args: list[str]) -> None:
    """Resolve ``offsite <args>`` to a command and parse its options (nothing runs)."""
    command: click.Command = CLI
    rest = list(args)
    while isinstance(command, click.Group):
        name, rest = rest[0], rest[1:]
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"`offsite {' '.join(args)}`: unknown command {name!r}"
        command = sub
    command.make_context(command.name or "", rest)


def _offsite_commands(text: str) -> list[list[str]]:
    """``offsite …`` invocations inside a shell string."""
    found = []
    for part in re.split(r"&&|\|\||;", text):
        words = shlex.split(part.strip())
        if words and words[0] == "offsite":
            found.append(words[1:])
    return found


def _substitute(args: list[str]) -> list[str]:
    return [re.sub(r"\$\{?(\w+)[^}]*\}?", r"value-of-\1", a) for a in args]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_compose_services_run_real_commands_and_references_resolve() -> None:
    compose = _compose()
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(".") or source in volumes, f"{name}: volume {source}"
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
        if service.get("image", "").startswith("offsite") and "command" in service:
            _parse_offsite(_substitute(service["command"]))
    ports = {p.split(":")[1] for p in services["coordinator"]["ports"]}
    defaults = _serve_defaults()
    assert ports == {defaults["enroll"], defaults["artifacts"], defaults["flower"]}


def _serve_defaults() -> dict[str, str]:
    serve = CLI.get_command(click.Context(CLI), "coordinator").get_command(
        click.Context(CLI), "serve"
    )
    return {
        p.name: str(p.default).rsplit(":", 1)[1]
        for p in serve.params
        if p.name in {"enroll", "artifacts", "flower"}
    }


def test_compose_variables_are_documented() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    documented = set(re.findall(r"^(\w+)=", (DEPLOY / ".env.example").read_text(), re.M))
    assert used and used <= documented, used - documented


def test_kubernetes_manifests_are_consistent() -> None:
    docs = _k8s()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    workloads = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]
    pod_labels = []
    for workload in workloads:
        spec = workload["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), workload["metadata"]
        pod = spec["template"]["spec"]
        ports = {
            p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])
        }
        pod_labels.append((labels, ports))
        templates = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or claim in claims, claim
        mounted = {v["name"] for v in pod.get("volumes", [])} | templates
        for container in pod["containers"] + pod.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in mounted, (workload["metadata"]["name"], mount)
            if container.get("image", "").startswith("offsite"):
                if "args" in container:
                    _parse_offsite(container["args"])
                for word in container.get("command", [])[2:]:
                    for args in _offsite_commands(word):
                        _parse_offsite(_substitute(args))
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matches = [ports for labels, ports in pod_labels if selector.items() <= labels.items()]
        assert matches, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in matches[0], (service["metadata"]["name"], port)


def test_dockerfile_pins_cpu_torch_first_and_exposes_the_service_ports() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    torch_at = text.index("torch==2.13.0")
    assert torch_at < text.index("pip install .")
    exposed = set(re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split())
    assert exposed == set(_serve_defaults().values())
    assert re.search(r'^ENTRYPOINT \["offsite"\]', text, re.M)
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (DEPLOY.parent / copied).exists(), copied


def test_example_config_loads() -> None:
    from offsite.config import load_config

    config = load_config(DEPLOY / "examples" / "simulate.toml")
    assert config.federation.secure_aggregation and config.privacy.epsilon == 8.0


@pytest.mark.parametrize("bad", [["coordinator", "serve", "--no-such-flag"], ["client", "joinn"]])
def test_the_command_checker_itself_catches_mistakes(bad: list[str]) -> None:
    with pytest.raises((click.UsageError, AssertionError)):
        _parse_offsite(bad)


def _coordinator_serve_args() -> list[list[str]]:
    compose = [_compose()["services"]["coordinator"]["command"]]
    k8s = [
        c["args"]
        for d in _k8s()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        if c.get("args", [])[:2] == ["coordinator", "serve"]
    ]
    return compose + k8s


def test_the_control_api_is_on_loopback_and_never_published() -> None:
    from offsite.host.network import is_loopback

    served = _coordinator_serve_args()
    assert len(served) == 2
    for args in served:
        control = args[args.index("--control") + 1]
        assert is_loopback(control), args
        port = control.rsplit(":", 1)[1]
        published = {p.split(":")[1] for p in _compose()["services"]["coordinator"]["ports"]}
        assert port not in published
        services = [d for d in _k8s() if d["kind"] == "Service"]
        assert all(str(p["port"]) != port for s in services for p in s["spec"]["ports"])
        dockerfile = (DEPLOY / "Dockerfile").read_text()
        assert port not in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()


def test_enrollment_tokens_never_sit_in_a_command_line_and_joins_are_idempotent() -> None:
    joins = [s["command"] for n, s in _compose()["services"].items() if n.endswith("-join")]
    for container in (
        c
        for d in _k8s()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"].get("initContainers", [])
        if c["name"] == "join"
    ):
        joins += [
            _substitute(a) for word in container["command"][2:] for a in _offsite_commands(word)
        ]
    assert len(joins) == 3
    for args in joins:
        assert "--token" not in args and "--exist-ok" in args, args
    assert "OFFSITE_ENROLL_TOKEN" in (DEPLOY / "compose.yaml").read_text()


def test_the_image_installs_nginx_for_the_fleet_proxy() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\bnginx\b", text)


def test_kuberay_example_parses_and_its_driver_joins_its_cluster() -> None:
    """deploy/kuberay: a RayCluster and a driver Job whose `offsite simulate` parses, whose
    config is valid, and whose ray_address is the cluster's head service; every pod mounts the
    run folder's volume at output_dir, and Ray's version is the one installed with Flower."""
    from importlib.metadata import version

    from offsite.config import load_config

    docs = [
        d
        for path in sorted((DEPLOY / "kuberay").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "RayCluster", "Job"}
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == version("ray")
    driver = kinds["Job"]["spec"]["template"]["spec"]
    args = driver["containers"][0]["args"]
    _parse_offsite(args)
    config = load_config(None, args[1:])
    assert config.federation.ray_address == f"{cluster['metadata']['name']}-head-svc:6379"
    pods = [
        cluster["spec"]["headGroupSpec"]["template"]["spec"],
        *(g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]),
        driver,
    ]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        volume = volumes[mounts[config.output_dir]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert all(c["image"] == "offsite:latest" for c in pod["containers"])
    # the driver's per-client resources fit the worker pods without idle actors (Ray offers a
    # pod's CPU limit and ~70 % of its memory limit; the rest is the object store)
    from coordinator.federation.simulation import RayEngine, slots

    engine = RayEngine.from_config(config.federation)
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        memory = int(limits["memory"].removesuffix("Gi")) * 2**30 * 0.7
        pooled, scheduled = slots(engine, {"CPU": float(limits["cpu"]), "memory": memory})
        assert pooled == scheduled >= 1, (pooled, scheduled)
