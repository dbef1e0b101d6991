#!/usr/bin/env python3
"""Check the deployment files against the code and against each other, without a Docker
engine or a running systemd.

    check_deploy.py docker BINARY   docker/Dockerfile, docker/compose.yaml, worker.env.example
    check_deploy.py config BINARY   config/flyio-image-manager.conf.example and .service

BINARY is the built flyio-image-manager. Each check prints "PASS name" or "FAIL name: why";
the last line is "N passed, N failed" and the exit status is 1 when anything failed.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

# FIM_CHECK_ROOT points the checks at another tree: the self-test's mutated copies.
ROOT = os.environ.get("FIM_CHECK_ROOT") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY_NAME = "flyio-image-manager"

# Settings in docker/worker.env.example that are not flyio-image-manager settings.
ENV_EXTRA_KEYS = {"DM_DISABLE_UDEV": "libdevmapper creates /dev/mapper nodes itself"}

# Runtime packages that are programs, not libraries the binary links, and why.
RUNTIME_TOOLS = {
    "e2fsprogs": "mkfs.ext4, run by the unpack stage",
    "thin-provisioning-tools": "thin_dump, run by the thin pool layer",
    "ca-certificates": "CA bundle for HTTPS to S3",
    "curl": "the HEALTHCHECK",
}
REQUIRED_TOOLS = ("e2fsprogs", "thin-provisioning-tools", "ca-certificates")

# In every Debian base image, so never listed.
BASE_LIBRARY_PACKAGES = {"libc6"}

# Sanitizer runtimes of an instrumented test build (FIM_SANITIZE=ON): never in the image.
SANITIZER_SONAME = re.compile(r"^lib(asan|ubsan|tsan|lsan|hwasan)\.so")


class Failure(Exception):
    pass


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def run(argv, env=None):
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


# ---- parsers ----------------------------------------------------------------------------


def config_table():
    """The settings table of config/config.c: [(name, default or None)] in order."""
    src = read("config/config.c")
    start = src.index("config_keys[] = {")
    end = src.index("\n};", start)
    rows = re.findall(r'\{"([A-Z0-9_]+)",\s*CONFIG_\w+,\s*STR\(\w+\),\s*(NULL|"[^"]*")',
                      src[start:end])
    if len(rows) < 10:
        raise Failure("could not read the settings table of config/config.c")
    return [(n, None if d == "NULL" else d[1:-1]) for n, d in rows]


def setup_packages():
    """The package list of scripts/setup.sh."""
    src = read("scripts/setup.sh")
    m = re.search(r"^packages=\((.*?)^\)", src, re.S | re.M)
    if not m:
        raise Failure("no packages=( ... ) array in scripts/setup.sh")
    words = []
    for line in m.group(1).splitlines():
        words += line.split("#", 1)[0].split()
    return set(words)


def dockerfile_stages():
    """docker/Dockerfile as stages: [{'from', 'name', 'instructions': [(KEYWORD, args)]}]."""
    logical, cur = [], ""
    for line in read("docker/Dockerfile").splitlines():
        stripped = line.strip()
        if not cur and (not stripped or stripped.startswith("#")):
            continue
        if cur and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            cur += stripped[:-1] + " "
            continue
        logical.append(cur + stripped)
        cur = ""
    stages = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"from": words[0], "name": name, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args.strip()))
    return stages


def apt_installed(stage):
    """Packages that `apt-get install` lines of a stage install."""
    pkgs = []
    for keyword, args in stage["instructions"]:
        if keyword != "RUN":
            continue
        for cmd in re.split(r"&&|;|\|\|", args):
            words = shlex.split(cmd)
            if "apt-get" in words and "install" in words:
                after = words[words.index("install") + 1:]
                pkgs += [w for w in after if not w.startswith("-")]
    return pkgs


def exec_form(stage, keyword):
    for kw, args in reversed(stage["instructions"]):
        if kw == keyword:
            try:
                value = json.loads(args)
            except ValueError:
                raise Failure(f"{keyword} is not in exec (JSON array) form: {args}")
            return value
    return None


def env_file(rel):
    """KEY=value lines of an env file, in order, as [(key, value)]."""
    pairs = []
    for line in read(rel).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise Failure(f"{rel}: line '{line}' is not KEY=value")
        k, v = line.split("=", 1)
        pairs.append((k.strip(), v.strip()))
    return pairs


def load_compose():
    try:
        import yaml
    except ImportError:
        raise Failure("PyYAML is missing: install python3-yaml (scripts/setup.sh lists it)")

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def no_duplicates(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise Failure(f"docker/compose.yaml: key '{key}' appears twice "
                              f"(line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, no_duplicates)
    try:
        doc = yaml.load(read("docker/compose.yaml"), Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise Failure(f"docker/compose.yaml is not valid YAML: {e}")
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise Failure("docker/compose.yaml has no services mapping")
    return doc


def show_config(binary, config_file, extra_env=None):
    """`BINARY --config FILE show-config` in a clean environment: {name: value}."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env.update(extra_env or {})
    p = run([binary, "--config", config_file, "show-config"], env=env)
    if p.returncode != 0:
        raise Failure(f"'{BINARY_NAME} --config {config_file} show-config' exited "
                      f"{p.returncode}: {p.stderr.strip()}")
    values = {}
    for line in p.stdout.splitlines():
        k, _, rest = line.partition("=")
        values[k] = rest.rsplit("  # ", 1)[0]
    return values


def seconds(duration):
    """Compose/systemd durations like '75s', '1m30s', '90' in seconds."""
    text, total = str(duration).strip(), 0
    if re.fullmatch(r"\d+", text):
        return int(text)
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise Failure(f"cannot read the duration '{duration}'")
    for n, unit in parts:
        total += int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# ---- library → package mapping -----------------------------------------------------------


def path_spellings(path):
    """@path, its real path, and each with and without the merged-/usr prefix."""
    out = []
    for p in (path, os.path.realpath(path)):
        for q in (p, p[4:] if p.startswith("/usr/") else "/usr" + p):
            if q not in out:
                out.append(q)
    return out


def dpkg_owners(paths):
    """{path: Debian package} for @paths, in one dpkg -S call (it is slow per call)."""
    spellings = {p: path_spellings(p) for p in paths}
    every = sorted({q for qs in spellings.values() for q in qs})
    owner_of = {}
    # Exit status 1 only says that some spelling is unknown, which is expected.
    for line in run(["dpkg", "-S"] + every).stdout.splitlines():
        pkgs, sep, p = line.partition(": ")
        if sep and not pkgs.startswith("diversion"):
            owner_of[p.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    result = {}
    for p, qs in spellings.items():
        found = [owner_of[q] for q in qs if q in owner_of]
        if not found:
            raise Failure(f"no Debian package owns '{p}' (dpkg -S)")
        result[p] = found[0]
    return result


def linked_libraries(binary):
    """{soname: path} for every library ldd resolves, and the directly NEEDED sonames."""
    ldd = run(["ldd", binary])
    if ldd.returncode != 0:
        raise Failure(f"ldd {binary} failed: {ldd.stderr.strip()}")
    paths = {}
    for line in ldd.stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(\S+)\s+\(", line)
        if m:
            paths[m.group(1)] = m.group(2)
        elif "not found" in line:
            raise Failure(f"ldd: {line.strip()}")
    readelf = run(["readelf", "-d", binary])
    if readelf.returncode != 0:
        raise Failure(f"readelf -d {binary} failed: {readelf.stderr.strip()}")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf.stdout)
    return paths, needed


def installed_depends(packages):
    """Every installed package that @packages depend on, recursively (Depends, Pre-Depends)."""
    r = run(["dpkg-query", "-W", "-f=${Package}\t${Depends}, ${Pre-Depends}\n"])
    deps = {}
    for line in r.stdout.splitlines():
        pkg, _, fields = line.partition("\t")
        names = [c.strip().split(" ")[0].split(":")[0]
                 for alt in fields.split(",") for c in alt.split("|")]
        deps[pkg] = [n for n in names if n]
    seen, todo = set(), list(packages)
    while todo:
        pkg = todo.pop()
        if pkg not in seen:
            seen.add(pkg)
            todo += deps.get(pkg, [])
    return seen


def base_packages():
    """Installed packages of priority required or marked Essential: in every Debian image."""
    r = run(["dpkg-query", "-W", "-f=${Package} ${Priority} ${Essential}\n"])
    base = set()
    for line in r.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and (words[1] == "required" or words[-1] == "yes"):
            base.add(words[0])
    return base


# ---- docker checks ------------------------------------------------------------------------


def docker_checks(binary):
    checks = []

    def check(fn):
        checks.append(fn)
        return fn

    stages = dockerfile_stages()
    build = next((s for s in stages if s["name"] == "build"), None)
    runtime = stages[-1] if stages else None

    @check
    def dockerfile_stages_are_bookworm():
        if not build:
            raise Failure("no stage named 'build' (FROM debian:bookworm AS build)")
        if build["from"] != "debian:bookworm":
            raise Failure(f"build stage is FROM {build['from']}, expected debian:bookworm")
        if runtime is build or runtime["from"] != "debian:bookworm-slim":
            raise Failure(f"last stage is FROM {runtime['from']}, expected debian:bookworm-slim")

    @check
    def dockerfile_build_packages_are_in_setup_sh():
        extra = sorted(set(apt_installed(build)) - setup_packages())
        if extra:
            raise Failure("the build stage installs packages scripts/setup.sh does not list: "
                          + ", ".join(extra) + " (add them to setup.sh or drop them)")

    @check
    def dockerfile_build_packages_cover_pkg_config_modules():
        src = read("cmake/FimDependencies.cmake") + read("tests/CMakeLists.txt")
        modules = re.findall(r"pkg_check_modules\(\w+\s+REQUIRED\s+IMPORTED_TARGET\s+([\w.+-]+)",
                             src)
        have, missing, pc = set(apt_installed(build)), [], {}
        for mod in modules:
            r = run(["pkg-config", "--variable=pcfiledir", mod])
            if r.returncode != 0:
                raise Failure(f"pkg-config does not know '{mod}' on this machine")
            pc[mod] = os.path.join(r.stdout.strip(), mod + ".pc")
        owners = dpkg_owners(list(pc.values()))
        for mod, path in pc.items():
            if owners[path] not in have:
                missing.append(f"{owners[path]} (for pkg-config module {mod})")
        if missing:
            raise Failure("the build stage lacks " + ", ".join(missing))

    @check
    def dockerfile_runtime_libraries_match_the_binary():
        paths, needed = linked_libraries(binary)
        sanitizers = [n for n in needed if SANITIZER_SONAME.match(n)]
        if sanitizers:
            # Their own dependencies (libstdc++, libgcc) stay in the closure below; they are
            # needed by listed packages or part of the base anyway.
            print("NOTE sanitizer build: ignoring " + ", ".join(sanitizers))
            needed = [n for n in needed if n not in sanitizers]
            paths = {k: v for k, v in paths.items() if k not in sanitizers}
        for soname in needed:
            if soname not in paths:
                raise Failure(f"ldd did not resolve NEEDED library {soname}")
        owners = dpkg_owners(list(paths.values()))
        want = {owners[paths[soname]] for soname in needed} - BASE_LIBRARY_PACKAGES
        listed = set(apt_installed(runtime)) - set(RUNTIME_TOOLS)
        problems = []
        if want - listed:
            problems.append("the binary links libraries from packages the runtime stage does "
                            "not install: " + ", ".join(sorted(want - listed)))
        if listed - want:
            problems.append("the runtime stage installs packages that are neither a library "
                            "the binary links nor a known tool: " + ", ".join(sorted(listed - want))
                            + " (drop them, or explain them in RUNTIME_TOOLS)")
        # Libraries those libraries load must come with them through package dependencies.
        covered = installed_depends(want) | base_packages()
        loose = sorted(set(owners.values()) - covered)
        if loose:
            problems.append("ldd resolves libraries from packages no listed package depends "
                            "on: " + ", ".join(loose))
        if problems:
            raise Failure("; ".join(problems))

    @check
    def dockerfile_runtime_has_the_tools_the_stages_run():
        missing = [t for t in REQUIRED_TOOLS if t not in apt_installed(runtime)]
        if missing:
            raise Failure("the runtime stage lacks " + ", ".join(
                f"{t} ({RUNTIME_TOOLS[t]})" for t in missing))

    @check
    def dockerfile_entrypoint_is_the_binary():
        entry = exec_form(runtime, "ENTRYPOINT")
        if not entry or os.path.basename(entry[0]) != BINARY_NAME:
            raise Failure(f"ENTRYPOINT {entry} does not name {BINARY_NAME}")
        copies = [a for k, a in runtime["instructions"] if k == "COPY" and "--from=build" in a]
        if not any(a.split()[-1] == entry[0] for a in copies):
            raise Failure(f"no COPY --from=build puts the binary at {entry[0]}")
        if exec_form(runtime, "CMD") != ["worker"]:
            raise Failure('CMD should be ["worker"]')
        if any(k == "USER" for k, _ in runtime["instructions"]):
            raise Failure("USER is set, but device-mapper and mount need root")

    @check
    def dockerfile_healthcheck_uses_healthz():
        hc = [a for k, a in runtime["instructions"] if k == "HEALTHCHECK"]
        if hc:
            if "/healthz" not in hc[0]:
                raise Failure("HEALTHCHECK does not ask /healthz")
            if "curl" in hc[0] and "curl" not in apt_installed(runtime):
                raise Failure("HEALTHCHECK uses curl, which the runtime stage does not install")

    doc = None

    @check
    def compose_parses_as_yaml():
        nonlocal doc
        doc = load_compose()

    def services():
        if doc is None:
            raise Failure("compose file did not parse")
        return doc["services"]

    def env_of(svc):
        """Environment of a service: its env_file entries, then environment."""
        env = {}
        files = svc.get("env_file", [])
        for entry in files if isinstance(files, list) else [files]:
            path = entry["path"] if isinstance(entry, dict) else entry
            required = entry.get("required", True) if isinstance(entry, dict) else True
            full = os.path.join(ROOT, "docker", path)
            if not os.path.exists(full):
                if required:
                    raise Failure(f"env_file '{path}' does not exist")
                continue
            env.update(env_file(os.path.join("docker", path)))
        environment = svc.get("environment", {})
        if isinstance(environment, list):
            environment = dict(e.split("=", 1) for e in environment)
        env.update({k: str(v) for k, v in environment.items()})
        return env

    def depends(svc):
        d = svc.get("depends_on", {})
        return {k: {} for k in d} if isinstance(d, list) else d

    @check
    def compose_has_the_services():
        missing = [s for s in ("kafka", "postgres", "s3", "migrate", "worker")
                   if s not in services()]
        if missing:
            raise Failure("missing services: " + ", ".join(missing))
        for name, svc in services().items():
            for dep in depends(svc):
                if dep not in services():
                    raise Failure(f"service '{name}' depends on unknown service '{dep}'")

    @check
    def compose_kafka_is_kraft_single_node():
        kafka = services()["kafka"]
        env = env_of(kafka)
        if not str(kafka.get("image", "")).startswith("apache/kafka:"):
            raise Failure(f"kafka image is {kafka.get('image')}, expected apache/kafka:<version>")
        roles = set(env.get("KAFKA_PROCESS_ROLES", "").split(","))
        if roles != {"broker", "controller"}:
            raise Failure("KAFKA_PROCESS_ROLES must be broker,controller (KRaft, one node)")
        if not env.get("KAFKA_CONTROLLER_QUORUM_VOTERS") or any("ZOOKEEPER" in k for k in env):
            raise Failure("kafka needs KAFKA_CONTROLLER_QUORUM_VOTERS and no ZooKeeper settings")
        if "healthcheck" not in kafka:
            raise Failure("kafka has no healthcheck for depends_on to wait on")

    @check
    def compose_kafka_writes_its_data_volume():
        # The image's default log dir is /tmp/kraft-combined-logs: without KAFKA_LOG_DIRS the
        # data volume stays empty and the topics live in the container's writable layer.
        kafka = services()["kafka"]
        log_dirs = env_of(kafka).get("KAFKA_LOG_DIRS", "")
        if not log_dirs:
            raise Failure("kafka has no KAFKA_LOG_DIRS: the image writes to "
                          "/tmp/kraft-combined-logs, not to its data volume")
        named = load_compose().get("volumes") or {}
        mounts = {}
        for v in kafka.get("volumes", []):
            if isinstance(v, str):
                source, _, rest = v.partition(":")
                target = rest.split(":")[0]
            else:
                source, target = v.get("source", ""), v.get("target", "")
            mounts[target.rstrip("/")] = source
        for d in log_dirs.split(","):
            d = d.strip().rstrip("/")
            source = mounts.get(d)
            if source is None:
                raise Failure(f"KAFKA_LOG_DIRS entry '{d}' is not a volume mount of kafka")
            if source not in named:
                raise Failure(f"'{d}' is mounted from '{source}', not a named volume: only a "
                              "named volume is seeded with the image's ownership of the "
                              "directory, so the broker's user (appuser) can write it")
            # The apache/kafka image creates this directory for appuser (appuser:root, ug+w);
            # another path would be seeded root-owned and unwritable.
            if d != "/var/lib/kafka/data":
                raise Failure(f"KAFKA_LOG_DIRS '{d}': the image's writable data directory is "
                              "/var/lib/kafka/data")
        if "user" in kafka and str(kafka["user"]) not in ("appuser", "1000"):
            raise Failure(f"kafka runs as user {kafka['user']}, not the image's appuser that "
                          "owns /var/lib/kafka/data")

    @check
    def compose_postgres_is_15_with_healthcheck():
        pg = services()["postgres"]
        if not re.match(r"postgres:15\b", str(pg.get("image", ""))):
            raise Failure(f"postgres image is {pg.get('image')}, expected postgres:15")
        if "healthcheck" not in pg:
            raise Failure("postgres has no healthcheck (migrate waits for service_healthy)")

    @check
    def compose_s3_is_s3proxy():
        image = str(services()["s3"].get("image", ""))
        if not image.startswith("andrewgaul/s3proxy:"):
            raise Failure(f"s3 image is {image}, expected andrewgaul/s3proxy:<version>")

    @check
    def compose_migrate_is_one_shot_after_postgres():
        mig, worker = services()["migrate"], services()["worker"]
        cmd = mig.get("command")
        cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
        if cmd != ["migrate"]:
            raise Failure(f"migrate's command is {cmd}, expected ['migrate']")
        if str(mig.get("restart", "no")) != "no":
            raise Failure("migrate must not restart (it is one-shot)")
        cond = depends(mig).get("postgres", {}).get("condition")
        if cond != "service_healthy":
            raise Failure("migrate must depend on postgres with condition: service_healthy")
        if mig.get("image") != worker.get("image"):
            raise Failure("migrate and worker must run the same image")

    @check
    def compose_worker_is_privileged_with_devices():
        w = services()["worker"]
        if w.get("privileged") is not True:
            raise Failure("worker must be privileged: true (device-mapper, mkfs, mount)")
        mounts = [str(v) if not isinstance(v, dict) else f"{v.get('source')}:{v.get('target')}"
                  for v in w.get("volumes", [])]
        for need in ("/dev:/dev", "/dev/mapper:/dev/mapper"):
            if not any(m == need or m.startswith(need + ":") for m in mounts):
                raise Failure(f"worker lacks the volume {need}")
        cond = depends(w).get("migrate", {}).get("condition")
        if cond != "service_completed_successfully":
            raise Failure("worker must depend on migrate with "
                          "condition: service_completed_successfully")
        cmd = w.get("command")
        if (shlex.split(cmd) if isinstance(cmd, str) else cmd) != ["worker"]:
            raise Failure(f"worker's command is {cmd}, expected ['worker']")

    def run_directory():
        """The directory of the pool's lock files and unpack mounts, from the sources."""
        dirs = set()
        for rel, name in (("stages/thin_pool.h", "THIN_POOL_LOCK_DIR"),
                          ("stages/unpack_stage.c", "UNPACK_MOUNT_BASE")):
            m = re.search(r'^#define\s+' + name + r'\s+"([^"]+)"', read(rel), re.M)
            if not m:
                raise Failure(f"{rel} no longer defines {name}; update this check")
            dirs.add(m.group(1))
        if len(dirs) != 1:
            raise Failure(f"lock and unpack mount directories differ: {sorted(dirs)}")
        return dirs.pop()

    @check
    def compose_worker_shares_the_run_directory():
        run_dir = run_directory()
        w = services()["worker"]
        binds = []
        for v in w.get("volumes", []):
            if isinstance(v, dict):
                binds.append((v.get("source"), v.get("target")))
            else:
                parts = str(v).split(":")
                binds.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
        if (run_dir, run_dir) not in binds:
            raise Failure(f"worker does not bind-mount the host's {run_dir} at {run_dir}: "
                          "processes sharing a pool must share its lock files and unpack "
                          "mounts")

    @check
    def compose_worker_settings():
        w = services()["worker"]
        env = env_of(w)
        problems = []
        if not env.get("POOL_NAME"):
            problems.append("POOL_NAME is not set")
        if env.get("DM_DISABLE_UDEV") != "1":
            problems.append("DM_DISABLE_UDEV=1 is not set (no udev in the container)")
        local_dir = env.get("LOCAL_DIR", "/var/lib/flyio/images")
        targets = [str(v).split(":")[1] if not isinstance(v, dict) else v.get("target")
                   for v in w.get("volumes", [])]
        if local_dir not in targets:
            problems.append(f"LOCAL_DIR {local_dir} is not a volume")
        addr = env.get("METRICS_ADDR", "")
        if not addr:
            problems.append("METRICS_ADDR is empty")
        else:
            port = addr.rsplit(":", 1)[1]
            published = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in w.get("ports", [])]
            if port not in published:
                problems.append(f"METRICS_ADDR port {port} is not published in ports")
        grace = seconds(w.get("stop_grace_period", "10s"))
        shutdown = int(env.get("SHUTDOWN_TIMEOUT", "60"))
        if grace <= shutdown:
            problems.append(f"stop_grace_period {grace}s is not above SHUTDOWN_TIMEOUT "
                            f"{shutdown}s")
        if problems:
            raise Failure("; ".join(problems))

    @check
    def compose_services_agree():
        s = services()
        env, problems = env_of(s["worker"]), []
        pg = env_of(s["postgres"])
        want_db = (f"postgresql://{pg.get('POSTGRES_USER')}:{pg.get('POSTGRES_PASSWORD')}"
                   f"@postgres:5432/{pg.get('POSTGRES_DB')}")
        if env.get("DATABASE_URL") != want_db:
            problems.append(f"DATABASE_URL should be {want_db}")
        if env.get("KAFKA_BROKERS") != "kafka:9092":
            problems.append("KAFKA_BROKERS should be kafka:9092")
        s3 = env_of(s["s3"])
        port = s3.get("S3PROXY_ENDPOINT", "http://0.0.0.0:80").rsplit(":", 1)[1]
        if env.get("S3_ENDPOINT") != f"http://s3:{port}":
            problems.append(f"S3_ENDPOINT should be http://s3:{port}")
        if (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")) != (
                s3.get("S3PROXY_IDENTITY"), s3.get("S3PROXY_CREDENTIAL")):
            problems.append("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY differ from S3Proxy's "
                            "identity/credential")
        for name, svc in s.items():
            for v in svc.get("volumes", []):
                src = str(v).split(":")[0] if not isinstance(v, dict) else v.get("source")
                if src and not src.startswith(("/", ".")) and src not in (doc.get("volumes") or {}):
                    problems.append(f"{name} uses volume '{src}', which is not declared")
        if problems:
            raise Failure("; ".join(problems))

    @check
    def env_example_keys_are_settings_and_parse():
        table = dict(config_table())
        pairs = env_file("docker/worker.env.example")
        unknown = [k for k, _ in pairs if k not in table and k not in ENV_EXTRA_KEYS]
        if unknown:
            raise Failure("docker/worker.env.example sets unknown settings: " + ", ".join(unknown))
        with tempfile.NamedTemporaryFile("w", suffix=".env") as f:
            f.writelines(f"{k}={v}\n" for k, v in pairs if k in table)
            f.flush()
            shown = show_config(binary, f.name)
        for k, v in pairs:
            if k in table and shown.get(k) not in (v, "[set]") and "://" not in v:
                raise Failure(f"show-config reads {k} from the example as '{shown.get(k)}', "
                              f"the file says '{v}'")

    return checks


# ---- config checks ------------------------------------------------------------------------


def config_checks(binary):
    checks = []

    def check(fn):
        checks.append(fn)
        return fn

    example = "config/flyio-image-manager.conf.example"
    unit_path = "config/flyio-image-manager.service"

    @check
    def conf_example_lists_every_setting_with_its_default():
        table = config_table()
        lines = read(example).splitlines()
        found, problems = {}, []
        for i, line in enumerate(lines):
            m = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
            if not m:
                continue
            name, value, commented = m.group(2), m.group(3), bool(m.group(1))
            if name in found:
                problems.append(f"{name} appears twice")
            found[name] = (value, commented)
            if i == 0 or not lines[i - 1].startswith("#") or re.match(r"^#\s*[A-Z_]+=",
                                                                      lines[i - 1]):
                problems.append(f"{name} has no comment line above it")
        names = {n for n, _ in table}
        for name, default in table:
            if name not in found:
                problems.append(f"{name} is missing")
                continue
            value, commented = found[name]
            if default is None and not commented:
                problems.append(f"{name} has no fixed default: leave it commented out")
            elif default is not None and (commented or value != default):
                problems.append(f"{name}={value} should be {name}={default} (the default in "
                                "config/config.c)")
        for name in sorted(set(found) - names):
            problems.append(f"{name} is not a setting in config/config.c")
        if problems:
            raise Failure("; ".join(problems))

    @check
    def conf_example_parses_with_show_config():
        with_example = show_config(binary, os.path.join(ROOT, example))
        defaults = show_config(binary, "/dev/null")
        diff = [k for k in defaults if with_example.get(k) != defaults[k]]
        if diff:
            raise Failure("the example changes " + ", ".join(
                f"{k} ({defaults[k]!r} -> {with_example.get(k)!r})" for k in diff))

    def unit():
        sections, current = {}, None
        for raw in read(unit_path).splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            k, _, v = line.partition("=")
            current.setdefault(k.strip(), []).append(v.strip())
        return sections

    @check
    def unit_runs_the_worker():
        svc = unit().get("Service", {})
        starts = svc.get("ExecStart", [])
        if len(starts) != 1:
            raise Failure("expected exactly one ExecStart=")
        argv = shlex.split(starts[0])
        if os.path.basename(argv[0]) != BINARY_NAME or "worker" not in argv[1:]:
            raise Failure(f"ExecStart={starts[0]} does not run '{BINARY_NAME} ... worker'")
        if "--config" not in argv:
            raise Failure("ExecStart= should name the config file with --config")

    @check
    def unit_stops_gracefully_and_restarts():
        svc, problems = unit().get("Service", {}), []
        want = {"Restart": "on-failure", "KillSignal": "SIGTERM"}
        for k, v in want.items():
            if svc.get(k) != [v]:
                problems.append(f"{k}= should be {v}")
        shutdown = int(dict(config_table())["SHUTDOWN_TIMEOUT"])
        stop = seconds(svc.get("TimeoutStopSec", ["90"])[0])
        if stop <= shutdown:
            problems.append(f"TimeoutStopSec={stop} is not above SHUTDOWN_TIMEOUT's default "
                            f"{shutdown}")
        for k, bad in (("User", None), ("DynamicUser", "yes"), ("PrivateDevices", "yes"),
                       ("RestrictSUIDSGID", "yes"), ("ProtectClock", "yes")):
            if k in svc and (bad is None or svc[k][-1] == bad):
                problems.append(f"{k}= breaks the worker (see the unit's comments)")
        if problems:
            raise Failure("; ".join(problems))

    @check
    def unit_passes_systemd_analyze_verify():
        # A missing tool is a failure, not a silent pass: scripts/setup.sh installs systemd.
        tool = shutil.which("systemd-analyze")
        if not tool:
            raise Failure("systemd-analyze is not installed, so the unit file was not verified: "
                          "run scripts/setup.sh (it installs the 'systemd' package)")
        with tempfile.TemporaryDirectory() as d:
            text = read(unit_path).replace("/usr/local/bin/" + BINARY_NAME,
                                           os.path.abspath(binary))
            path = os.path.join(d, os.path.basename(unit_path))
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            r = run([tool, "verify", path])
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            raise Failure("systemd-analyze verify: " + (out or f"exit {r.returncode}"))

    return checks


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("docker", "config"):
        print(__doc__, file=sys.stderr)
        return 2
    binary = sys.argv[2]
    if not os.access(binary, os.X_OK):
        print(f"FAIL setup: {binary} is not an executable", file=sys.stderr)
        return 1
    checks = docker_checks(binary) if sys.argv[1] == "docker" else config_checks(binary)
    passed = failed = 0
    for fn in checks:
        try:
            fn()
        except Failure as e:
            failed += 1
            print(f"FAIL {fn.__name__}: {e}")
        else:
            passed += 1
            print(f"PASS {fn.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
