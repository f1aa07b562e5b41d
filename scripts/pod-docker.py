#!/usr/bin/env python3
"""Runs a Pod manifest in Docker the way a kubelet would, for the containers demo and its test.

A tool for this repository's tests and demo, not part of the product. It translates the fields of
the Pod that matter on one node into `docker run` flags and follows kubelet's order:

1. the sandbox: a pause container holding the pod's network and IPC namespaces, on a Docker
   bridge network in 198.19.0.0/16 created for the pod (reachable from the host: the bridge's
   subnet is directly connected; Docker adds no packet-filter rule when started by
   scripts/docker.sh);
2. the init containers in order: an ordinary one runs to completion and must exit 0; a native
   sidecar (restartPolicy: Always) is started and, when it has a startupProbe, the next container
   waits until the probe succeeds;
3. the containers; then it waits until every readinessProbe succeeds (the pod is Ready) and, unlike
   kubelet, until the app containers' declared ports accept connections (see wait_ports).

Translated: image (through --image FROM=TO substitutions), command, args, env (plain values),
securityContext (runAsUser, runAsGroup, runAsNonRoot checked as kubelet does, capabilities add and
drop, readOnlyRootFilesystem, allowPrivilegeEscalation, privileged; container fields over the
pod's), resources (cpu request as CPU shares, cpu and memory limits), terminationGracePeriodSeconds
(the stop timeout), httpGet probes (run from the host against the pod's address). Every other
container field is refused by name, so that nothing in the manifest is silently ignored, except
ports (informational in a pod), imagePullPolicy (images are local) and livenessProbe (nothing here
restarts containers).

Usage:
  pod-docker.py up MANIFEST --pod NAME [--image FROM=TO ...]   prints {"ip": ..., "containers": {...}}
  pod-docker.py down --pod NAME                                removes its containers and network
  pod-docker.py check MANIFEST                                 only the refusals, no Docker needed
Every docker command is printed on stderr, as run, before it runs.
"""

import argparse
import ipaddress
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

LABEL = "io.amazing-proxy.pod"
PAUSE_IMAGE = "amazing-proxy-local/pause"
# Subnets for pod networks, in the 198.19.0.0/16 that scripts/docker.sh gives Docker.
SUBNETS = [ipaddress.ip_network(f"198.19.{n}.0/24") for n in range(1, 255)]
PASSED_OVER = {"name", "ports", "imagePullPolicy", "livenessProbe", "terminationMessagePath",
               "terminationMessagePolicy"}
TRANSLATED = {"image", "command", "args", "env", "securityContext", "resources", "startupProbe",
              "readinessProbe", "restartPolicy"}
SPEC_TRANSLATED = {"containers", "initContainers", "securityContext", "terminationGracePeriodSeconds"}
POD_SECURITY_TRANSLATED = {"runAsUser", "runAsGroup", "runAsNonRoot"}


class PodError(Exception):
    pass


def docker(*args, timeout=120, check=True):
    cmd = ["docker", *args]
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, timeout=timeout, text=True, capture_output=True)
    except subprocess.TimeoutExpired as e:
        raise PodError(f"{shlex.join(cmd)} did not finish within {timeout}s") from e
    if check and done.returncode != 0:
        raise PodError(f"{shlex.join(cmd)} exited {done.returncode}: {(done.stderr or '').strip()}")
    return done


def network_name(pod):
    return f"amazing-proxy-{pod}"


def create_network(pod):
    taken = subprocess.run(["ip", "-4", "route"], text=True, capture_output=True, timeout=10).stdout
    for subnet in SUBNETS:
        prefix = str(subnet.network_address).rsplit(".", 1)[0] + "."
        if prefix in taken:
            continue
        gateway = str(next(subnet.hosts()))
        done = docker("network", "create", "--driver", "bridge", "--subnet", str(subnet),
                      "--gateway", gateway, "--label", f"{LABEL}={pod}", network_name(pod), check=False)
        if done.returncode == 0:
            return
        if "overlap" not in done.stderr:
            raise PodError(f"cannot create the pod's network: {done.stderr.strip()}")
    raise PodError("no free /24 left in 198.19.0.0/16 for the pod's network")


def quantity_millicpu(q):
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def quantity_bytes(q):
    q = str(q)
    for suffix, factor in (("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 10**3),
                           ("M", 10**6), ("G", 10**9)):
        if q.endswith(suffix):
            return int(float(q[:-len(suffix)]) * factor)
    return int(q)


def security_flags(name, container, pod_security, image_user):
    sc = {**pod_security, **container.get("securityContext", {})}
    flags = []
    known = {"runAsUser", "runAsGroup", "runAsNonRoot", "capabilities", "readOnlyRootFilesystem",
             "allowPrivilegeEscalation", "privileged"}
    unknown = set(sc) - known
    if unknown:
        raise PodError(f"container {name}: securityContext fields not translated: {sorted(unknown)}")
    uid = sc.get("runAsUser")
    if uid is None and "runAsGroup" in sc:
        raise PodError(f"container {name}: runAsGroup without runAsUser is not translated")
    if uid is not None:
        user = str(uid) + (f":{sc['runAsGroup']}" if "runAsGroup" in sc else "")
        flags += ["--user", user]
    if sc.get("runAsNonRoot") and image_user is not None:
        # As kubelet: the effective uid must be known and non-zero.
        effective = uid if uid is not None else image_user.split(":")[0]
        if not str(effective).isdigit() or int(effective) == 0:
            raise PodError(f"container {name}: runAsNonRoot but it would run as {effective or 'root'}")
    caps = sc.get("capabilities", {})
    for cap in caps.get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        flags += ["--cap-add", cap]
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sc.get("privileged"):
        flags.append("--privileged")
    return flags


def check(manifest):
    """Refuses, before anything is created, a manifest with fields this translation would drop."""
    if manifest.get("kind") != "Pod":
        raise PodError(f"expected a Pod, got {manifest.get('kind')}")
    spec = manifest["spec"]
    unknown = set(spec) - SPEC_TRANSLATED
    if unknown:
        raise PodError(f"spec fields not translated: {sorted(unknown)}")
    unknown = set(spec.get("securityContext", {})) - POD_SECURITY_TRANSLATED
    if unknown:
        raise PodError(f"spec.securityContext fields not translated: {sorted(unknown)}")
    for container in spec.get("initContainers", []) + spec["containers"]:
        name = container["name"]
        unknown = set(container) - PASSED_OVER - TRANSLATED
        if unknown:
            raise PodError(f"container {name}: fields not translated: {sorted(unknown)}")
        for var in container.get("env", []):
            if "value" not in var:
                raise PodError(f"container {name}: env {var.get('name')} has no plain value")
        security_flags(name, container, spec.get("securityContext", {}), image_user=None)
        for kind in ("startupProbe", "readinessProbe"):
            if kind in container and "httpGet" not in container[kind]:
                raise PodError(f"container {name}: only httpGet probes are translated ({kind})")


def run_flags(pod, spec, container, images):
    name = container["name"]
    image = images.get(container["image"], container["image"])
    image_user = docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    flags = ["--name", f"{pod}-{name}", "--label", f"{LABEL}={pod}",
             "--network", f"container:{pod}-pause", "--ipc", f"container:{pod}-pause",
             "--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30))]
    for var in container.get("env", []):
        flags += ["--env", f"{var['name']}={var['value']}"]
    flags += security_flags(name, container, spec.get("securityContext", {}), image_user)
    resources = container.get("resources", {})
    if "cpu" in resources.get("requests", {}):
        # kubelet's cpu.shares: milliCPU * 1024 / 1000, at least 2.
        flags += ["--cpu-shares", str(max(2, quantity_millicpu(resources["requests"]["cpu"]) * 1024 // 1000))]
    limits = resources.get("limits", {})
    if "cpu" in limits:
        flags += ["--cpus", str(quantity_millicpu(limits["cpu"]) / 1000)]
    if "memory" in limits:
        flags += ["--memory", str(quantity_bytes(limits["memory"]))]
    command = container.get("command")
    if command:
        flags += ["--entrypoint", command[0]]
    return flags + [image] + (command[1:] if command else []) + container.get("args", [])


def probe_once(ip, container, probe):
    get = probe.get("httpGet")
    if get is None:
        raise PodError(f"container {container['name']}: only httpGet probes are translated")
    port = get["port"]
    if isinstance(port, str):
        port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)
        if port is None:
            raise PodError(f"container {container['name']}: probe port {get['port']} is not declared")
    url = f"{get.get('scheme', 'HTTP').lower()}://{ip}:{port}{get.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as resp:
            return 200 <= resp.status < 400
    except (urllib.error.URLError, OSError):
        return False


def wait_probe(ip, pod, container, kind, limit=None):
    probe = container.get(kind)
    if probe is None:
        return
    period = probe.get("periodSeconds", 10)
    # A startup probe gives up after failureThreshold periods, as kubelet does; readiness has no
    # such end, so the caller's limit bounds it.
    attempts = probe.get("failureThreshold", 3) if kind == "startupProbe" else limit // period + 1
    time.sleep(probe.get("initialDelaySeconds", 0))
    for _ in range(max(1, attempts)):
        if probe_once(ip, container, probe):
            return
        state = docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                       f"{pod}-{container['name']}").stdout.strip()
        if not state.startswith("running"):
            raise PodError(f"container {container['name']} stopped ({state}) before its {kind} passed")
        time.sleep(period)
    raise PodError(f"container {container['name']}: {kind} did not pass")


def wait_ports(pod, containers, limit=60):
    """Waits until the app containers' declared TCP ports accept connections inside the pod.

    Not kubelet's doing: a container without a readinessProbe (the tutorial's httpbin) counts as
    ready once started, so a request sent at once can race the app's start and get a 502 from the
    proxy. Checked from the pod's network namespace (nsenter), on loopback, which the redirect
    rules leave alone."""
    pid = docker("inspect", "--format", "{{.State.Pid}}", f"{pod}-pause").stdout.strip()
    ports = [p["containerPort"] for c in containers for p in c.get("ports", [])
             if p.get("protocol", "TCP") == "TCP"]
    connect = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)"
    for port in ports:
        deadline = time.monotonic() + limit
        while subprocess.run(["nsenter", "-t", pid, "-n", sys.executable, "-c", connect, str(port)],
                             capture_output=True, timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise PodError(f"nothing listens on the pod's port {port} after {limit}s")
            time.sleep(0.2)


def load(path):
    with open(path) as f:
        manifest = yaml.safe_load(f)
    try:
        check(manifest)
    except PodError as e:
        raise PodError(f"{path}: {e}") from e
    return manifest


def up(args):
    manifest = load(args.manifest)
    spec = manifest["spec"]
    images = dict(pair.split("=", 1) for pair in args.image)
    pod = args.pod
    create_network(pod)
    docker("run", "--detach", "--name", f"{pod}-pause", "--label", f"{LABEL}={pod}",
           "--hostname", manifest["metadata"]["name"], "--network", network_name(pod),
           "--ipc", "shareable", PAUSE_IMAGE)
    ip = docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                f"{pod}-pause").stdout.strip()
    names = {}
    for container in spec.get("initContainers", []):
        flags = run_flags(pod, spec, container, images)
        names[container["name"]] = f"{pod}-{container['name']}"
        if container.get("restartPolicy") == "Always":
            docker("run", "--detach", *flags)
            wait_probe(ip, pod, container, "startupProbe")
        else:
            # Attached: its exit status is ours to check, and its output is shown.
            done = docker("run", *flags, timeout=300, check=False)
            sys.stderr.write(done.stdout)
            # Docker warns that forwarding is off (scripts/docker.sh leaves the host's setting);
            # the pod is reached from the host over its bridge, which needs none.
            sys.stderr.writelines(line for line in done.stderr.splitlines(keepends=True)
                                  if "IPv4 forwarding is disabled" not in line)
            if done.returncode != 0:
                raise PodError(f"init container {container['name']} exited {done.returncode}")
    for container in spec["containers"]:
        docker("run", "--detach", *run_flags(pod, spec, container, images))
        names[container["name"]] = f"{pod}-{container['name']}"
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    for container in sidecars + spec["containers"]:
        wait_probe(ip, pod, container, "readinessProbe", limit=60)
    wait_ports(pod, spec["containers"])
    print(json.dumps({"ip": ip, "containers": names}))


def down(args):
    ids = subprocess.run(["docker", "ps", "--all", "--quiet", "--filter", f"label={LABEL}={args.pod}"],
                         text=True, capture_output=True, timeout=60).stdout.split()
    if ids:
        docker("rm", "--force", "--volumes", *ids, check=False)
    if subprocess.run(["docker", "network", "inspect", network_name(args.pod)],
                      capture_output=True, timeout=60).returncode == 0:
        docker("network", "rm", network_name(args.pod), check=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("manifest")
    p_up.add_argument("--pod", required=True)
    p_up.add_argument("--image", action="append", default=[], metavar="FROM=TO")
    p_down = sub.add_parser("down")
    p_down.add_argument("--pod", required=True)
    p_check = sub.add_parser("check")
    p_check.add_argument("manifest")
    args = parser.parse_args()
    try:
        {"up": up, "down": down, "check": lambda a: load(a.manifest)}[args.action](args)
    except PodError as e:
        print(f"pod-docker: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
