"""Run compose/docker-compose.yml with podman, where there is neither Docker nor
podman-compose: the subset of the compose file format that file uses.

    python compose/podman/compose.py [-f FILE] build|up|down|ps|logs|exec ...

- ``build``: the images of the services with ``build:`` (each image once).
- ``up [--skip SVC ...]``: build, then start every service in dependency order, detached, as
  container PROJECT-SERVICE on the host's network; a dependency with ``condition:
  service_completed_successfully`` is waited for (exit 0). A service whose image is neither
  built nor present locally is skipped when named by ``--skip``, else an error.
- ``down [--volumes]``: remove the project's containers (by name), and its volumes.
- ``ps``, ``logs SERVICE``, ``exec SERVICE CMD...``: as podman's, by service name.

Settings from the environment: CONTAINERS_CONF (default: containers.conf beside this file),
DRCTL_PODMAN_RUNTIME (default: runc where it is installed: crun refuses a cgroup v1 + v2
hybrid), and the variables the compose file interpolates (``${NAME:-default}``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
COMPOSE = os.path.join(os.path.dirname(HERE), "docker-compose.yml")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(node: Any) -> Any:
    if isinstance(node, str):
        return VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), node)
    if isinstance(node, list):
        return [interpolate(x) for x in node]
    if isinstance(node, dict):
        return {k: interpolate(v) for k, v in node.items()}
    return node


class Project:
    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            doc = interpolate(yaml.safe_load(fh))
        self.dir = os.path.dirname(os.path.abspath(path))
        self.name: str = doc.get("name") or os.path.basename(self.dir)
        self.services: dict[str, dict[str, Any]] = {
            k: v for k, v in doc["services"].items() if not k.startswith("x-")}
        self.volumes: list[str] = list(doc.get("volumes") or {})
        runtime = os.environ.get("DRCTL_PODMAN_RUNTIME", "runc" if shutil.which("runc") else "")
        self.podman = ["podman", *(["--runtime", runtime] if runtime else [])]
        os.environ.setdefault("CONTAINERS_CONF", os.path.join(HERE, "containers.conf"))

    def container(self, svc: str) -> str:
        return f"{self.name}-{svc}"

    def run(self, *args: str, check: bool = True, echo: bool = True,
            discard: bool = False) -> int:
        if echo:
            print("+ podman " + " ".join(shlex.quote(a) for a in args), flush=True)
        r = subprocess.run([*self.podman, *args],
                           stdout=subprocess.DEVNULL if discard else None)
        if check and r.returncode != 0:
            sys.exit(f"compose: podman {args[0]} failed ({r.returncode})")
        return r.returncode

    def order(self) -> list[str]:
        """Services, each after what it depends on."""
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in path:
                sys.exit(f"compose: a dependency cycle: {' -> '.join((*path, name))}")
            for dep in self.depends(name):
                visit(dep, (*path, name))
            done.append(name)

        for name in self.services:
            visit(name, ())
        return done

    def depends(self, name: str) -> dict[str, str]:
        deps = self.services[name].get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}

    def build(self, only: set[str] | None = None) -> None:
        built: set[str] = set()
        for name, svc in self.services.items():
            b, image = svc.get("build"), svc.get("image") or f"{self.name}-{name}"
            if not b or image in built or (only is not None and name not in only):
                continue
            context = os.path.normpath(os.path.join(self.dir, b.get("context", ".")))
            args = ["build", "--network", "host", "-t", image]
            if b.get("dockerfile"):
                args += ["-f", os.path.join(context, b["dockerfile"])]
            for k, v in (b.get("args") or {}).items():
                args += ["--build-arg", f"{k}={v}"]
            old = self.image_id(image)
            started = time.monotonic()
            self.run(*args, context)
            print(f"compose: built {image} in {time.monotonic() - started:.0f}s", flush=True)
            built.add(image)
            if old and old != self.image_id(image):  # the previous build, now untagged
                self.run("rmi", old, check=False, echo=False, discard=True)

    def image_id(self, image: str) -> str:
        r = subprocess.run([*self.podman, "image", "inspect", "--format", "{{.Id}}", image],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    def volume(self, spec: str) -> str:
        src, _, rest = spec.partition(":")
        if src.startswith((".", "/")):
            src = os.path.normpath(os.path.join(self.dir, src))
        else:
            src = f"{self.name}_{src}"
        return f"{src}:{rest}"

    def start(self, name: str) -> None:
        svc = self.services[name]
        image = svc.get("image") or f"{self.name}-{name}"
        args = ["run", "-d", "--name", self.container(name), "--network", "host"]
        entry = svc.get("entrypoint")
        if entry is not None:
            args += ["--entrypoint", json.dumps(entry if isinstance(entry, list)
                                                else shlex.split(entry))]
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        for spec in svc.get("volumes") or []:
            args += ["-v", self.volume(spec)]
        command = svc.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        self.run(*args, image, *(command or []))

    def wait_done(self, name: str) -> None:
        out = subprocess.run([*self.podman, "wait", self.container(name)], capture_output=True,
                             text=True)
        code = out.stdout.strip()
        if out.returncode != 0 or code != "0":
            subprocess.run([*self.podman, "logs", self.container(name)])
            sys.exit(f"compose: {name} exited with {code or out.stderr.strip()}")

    def up(self, skip: set[str]) -> None:
        self.build({n for n in self.services if n not in skip})
        for name in self.order():
            if name in skip:
                print(f"compose: skipping {name}", flush=True)
                continue
            for dep, condition in self.depends(name).items():
                if dep not in skip and condition == "service_completed_successfully":
                    self.wait_done(dep)
            self.start(name)

    def down(self, volumes: bool) -> None:
        for name in reversed(self.order()):
            self.run("rm", "-f", "-t", "15", self.container(name), check=False, echo=False,
                     discard=True)
        if volumes:
            for vol in self.volumes:
                self.run("volume", "rm", "-f", f"{self.name}_{vol}", check=False, echo=False,
                         discard=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compose", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", "--file", default=COMPOSE)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    up = sub.add_parser("up")
    up.add_argument("--skip", action="append", default=[], metavar="SERVICE")
    down = sub.add_parser("down")
    down.add_argument("--volumes", action="store_true")
    sub.add_parser("ps")
    logs = sub.add_parser("logs")
    logs.add_argument("service")
    ex = sub.add_parser("exec")
    ex.add_argument("service")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    project = Project(args.file)
    if args.cmd == "build":
        project.build()
    elif args.cmd == "up":
        project.up(set(args.skip))
    elif args.cmd == "down":
        project.down(args.volumes)
    elif args.cmd == "ps":
        return project.run("ps", "-a", "--filter", f"name=^{project.name}-", check=False,
                           echo=False)
    elif args.cmd == "logs":
        return project.run("logs", project.container(args.service), check=False, echo=False)
    else:
        return project.run("exec", project.container(args.service), *args.command,
                           check=False, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
