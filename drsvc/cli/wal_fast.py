"""`drsvc wal-push` and the cached path of `drsvc wal-fetch`, run before anything heavy is imported.

PostgreSQL runs archive_command once per WAL segment, one at a time, and waits; restore_command likewise. A
`drsvc` that loads its machinery (asyncio, pydantic, cryptography, zstandard, minio) needs 0.4 s to start;
this path needs the interpreter, tomllib and ``drsvc.core.pgwal``. ``main.main`` calls ``dispatch`` first:

- ``wal-push SOURCE PATH``: read ``state.dir`` from the config (tomllib only; the daemon validates the whole
  file), check that SOURCE is a postgres source, copy PATH durably into its incoming directory
  (``pgwal.push``), exit 0. Failures exit 1 with one line on stderr: PostgreSQL keeps the file and retries.
- ``wal-fetch SOURCE NAME PATH`` when NAME is in the prefetch cache: move it to PATH and, when fewer than half
  the prefetch depth is cached ahead, start a prefetcher (`drsvc wal-prefetch`, detached), exit 0.

The prefetcher holds the cache's lock, inherited from here, so that no second one starts while the first is
loading. Anything else (another verb, an option this parser does not know, a cache miss) returns None: the
full CLI (``wal_cmd``) runs, with the same options.
"""

from __future__ import annotations

import os
import sys

from drsvc.core import pgwal
from drsvc.core.errors import DRError

EXIT_FAILURE = 1
# wal-fetch could not tell whether the file exists (an error, not "missing"): above 125, PostgreSQL stops
# recovery instead of taking the failure for the end of the archive and promoting with data missing
EXIT_ABORT_RECOVERY = 126
DEFAULT_PREFETCH = 8
# verb -> (number of positionals, options taking a value)
VERBS = {
    "wal-push": (2, ()),
    "wal-fetch": (3, ("--cache", "--prefetch", "--only-site")),
}


class Call:
    """One parsed command line (a plain class: a dataclass or NamedTuple costs milliseconds to define)."""

    __slots__ = ("args", "config", "options", "verb")

    def __init__(self, config: str, verb: str, args: list[str], options: dict[str, str]) -> None:
        self.config = config
        self.verb = verb
        self.args = args  # the positionals
        self.options = options


def parse(argv: list[str]) -> Call | None:
    """`[-c CONFIG] VERB [OPTIONS] ARGS` for the verbs above; None for anything else, which argparse then
    handles (and explains)."""
    config = os.environ.get("DRSVC_CONFIG", "/etc/drsvc/drsvc.toml")
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt in ("-c", "--config") and rest:
            config = rest.pop(0)
        elif opt.startswith("--config="):
            config = opt.partition("=")[2]
        elif opt.startswith("-c") and len(opt) > 2 and not opt.startswith("--"):
            config = opt[2:]
        else:
            return None
    if not rest or rest[0] not in VERBS:
        return None
    verb, rest = rest[0], rest[1:]
    count, known = VERBS[verb]
    options: dict[str, str] = {}
    positionals: list[str] = []
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in known:
            if not eq:
                if not rest:
                    return None
                value = rest.pop(0)
            options[name] = value
        elif arg.startswith("-") and arg != "-":
            return None
        else:
            positionals.append(arg)
    if len(positionals) != count or not all(v.isdigit() for k, v in options.items() if k == "--prefetch"):
        return None
    return Call(config, verb, positionals, options)


def dispatch(argv: list[str]) -> int | None:
    call = parse(argv)
    if call is None:
        return None
    if call.verb == "wal-push":
        return run_push(call.config, *call.args)
    source, name, path = call.args
    prefetch = int(call.options.get("--prefetch", DEFAULT_PREFETCH))
    cache, only_site = call.options.get("--cache"), call.options.get("--only-site")
    return fetch_cached(call.config, source, name, path, cache, prefetch, only_site)


# ---- wal-push ---------------------------------------------------------------------------------------


def run_push(config: str, source: str, path: str) -> int:
    try:
        pgwal.push(path, incoming_for(config, source))
    except DRError as exc:
        print(f"drsvc wal-push: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"drsvc wal-push: error: {exc.strerror or exc} ({exc.filename or path})", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def incoming_for(config: str, source: str) -> str:
    """The incoming directory of postgres source `source`: its `incoming` setting, else
    ``<state.dir>/incoming/wal/<source>`` (relative paths: to the config file's directory). Only these keys
    are read: `drsvc config check` and the daemon check the rest. The answer is cached per user and config
    file (see ``_cache_path``) while the file is unchanged: parsing TOML costs a push a sixth of its time."""
    try:
        st = os.stat(config)
    except OSError as exc:
        raise pgwal.WalPushError(f"cannot read the config file: {exc.strerror}", key=config) from None
    stamp = f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
    cache = _cache_path(config)
    cached = _read_cache(cache, stamp) if cache is not None else None
    if cached is not None and source in cached:
        return cached[source]
    import tomllib

    try:
        with open(config, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise pgwal.WalPushError(f"cannot read the config file: {exc.strerror}", key=config) from None
    except tomllib.TOMLDecodeError as exc:
        raise pgwal.WalPushError(f"the config file is not valid TOML: {exc}", key=config) from None
    sources = data.get("sources", {})
    src = sources.get(source) if isinstance(sources, dict) else None
    if not isinstance(src, dict):
        raise pgwal.WalPushError(f"no source {source!r} in the config", key="sources")
    if src.get("type") != "postgres":
        raise pgwal.WalPushError(f"source {source!r} is not a postgres source", key=f"sources.{source}.type")
    base = os.path.dirname(os.path.abspath(config))
    d = data.get("state", {}).get("dir")
    if not isinstance(d, str) or not d:
        raise pgwal.WalPushError("the config sets no state.dir", key="state.dir")
    dirs: dict[str, str] = {}
    for name, v in sources.items():
        if isinstance(v, dict) and v.get("type") == "postgres":
            own = v.get("incoming")
            if own is not None and (not isinstance(own, str) or not own):
                raise pgwal.WalPushError("not a directory path", key=f"sources.{name}.incoming")
            dirs[name] = os.path.join(base, own) if own else pgwal.incoming_dir(os.path.join(base, d), name)
    if cache is not None and not any("\n" in x or "\t" in x for kv in dirs.items() for x in kv):
        _write_cache(cache, "".join([f"{stamp}\n", *(f"{n}\t{p}\n" for n, p in dirs.items())]))
    return dirs[source]


CACHE_ROOT = "/tmp"


def _cache_path(config: str) -> str | None:
    """``/tmp/drsvc-<uid>/<config path, / as %>``, in a directory only this user may use (created 0700 if
    absent); None when there is none to be had (then every push parses the config)."""
    d = os.path.join(CACHE_ROOT, f"drsvc-{os.geteuid()}")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not (st.st_mode & 0o170000 == 0o040000 and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0):
        return None  # not a directory of ours, or others may write it: trust nothing in it
    name = os.path.abspath(config).replace("%", "%25").replace("/", "%")
    return os.path.join(d, name) if len(name) <= 200 else None


def _read_cache(path: str, stamp: str) -> dict[str, str] | None:
    """Postgres source -> incoming directory, if the cache was written for the config file as it is now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return None
        lines = os.read(fd, 65536).decode("utf-8", "replace").split("\n")
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(lines) < 2 or lines[0] != stamp or lines[-1] != "":
        return None
    pairs = [line.split("\t") for line in lines[1:-1]]
    if not all(len(p) == 2 for p in pairs):
        return None
    return {name: d for name, d in pairs}


def _write_cache(path: str, text: str) -> None:
    """Best effort, atomically (temp file and rename); a cache needs no fsync."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# ---- wal-fetch, from the prefetch cache -------------------------------------------------------------


def cache_dir(path: str, cache: str | None) -> str:
    """The prefetch cache: `cache`, else ``drsvc-prefetch`` beside PATH (in pg_wal, on its file system)."""
    return cache if cache is not None else os.path.join(os.path.dirname(path) or ".", pgwal.PREFETCH_DIR)


def fetch_cached(
    config: str,
    source: str,
    name: str,
    path: str,
    cache: str | None,
    prefetch: int,
    only_site: str | None = None,
) -> int | None:
    """wal-fetch from the cache: 0 when NAME was moved to PATH, None when it is not cached (the full CLI
    fetches it), EXIT_ABORT_RECOVERY when the cache could not be read. Starts a prefetcher when running low
    (its failure costs speed, never the file already in place)."""
    d = cache_dir(path, cache)
    try:
        if not pgwal.take_cached(d, name, path):
            return None
    except OSError as exc:
        print(f"drsvc wal-fetch: error: {exc.strerror or exc} ({exc.filename or d})", file=sys.stderr)
        return EXIT_ABORT_RECOVERY
    if prefetch > 0 and pgwal.is_segment(name):
        try:
            seg_size = os.stat(path).st_size
            low = max(1, prefetch // 2)
            if pgwal.cached_ahead(d, name, seg_size, low) < low:
                start_prefetch(config, source, name, seg_size, prefetch, d, only_site)
        except OSError:
            pass
    return 0


def start_prefetch(
    config: str, source: str, after: str, seg_size: int, count: int, cache: str, only_site: str | None = None
) -> bool:
    """Start a detached `drsvc wal-prefetch` filling `cache` unless one is running (reading `only_site`
    alone, when given, like the wal-fetch that starts it)."""
    os.makedirs(cache, mode=0o700, exist_ok=True)
    args = ["wal-prefetch", source, after, "--seg-size", str(seg_size), "--count", str(count)]
    if only_site is not None:
        args += ["--only-site", only_site]
    return start_detached(config, [*args, "--cache", cache], os.path.join(cache, pgwal.LOCK_FILE))


def start_detached(config: str, args: list[str], lock: str) -> bool:
    """Start `drsvc -c CONFIG ARGS --lock-fd N` in a session of its own, holding the lock file `lock`
    (inherited: it is held from here on, until the child exits), unless another process holds it. True if
    started."""
    import subprocess

    fd = pgwal.try_lock(lock)
    if fd is None:
        return False
    try:
        subprocess.Popen(
            [sys.executable, "-m", "drsvc.cli.main", "-c", config, *args, "--lock-fd", str(fd)],
            pass_fds=(fd,),
            start_new_session=True,  # PostgreSQL waits for its command, not for this
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(fd)
    return True
