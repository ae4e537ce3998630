"""Files written so that nothing half-written is ever left behind, and their digests."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from glmc.errors import GlmcError


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` in one rename.

    The sibling's name records its writer (`.NAME.partial-PID@HOST+...`), so that one left by
    a killed writer is removed by the next writer of `target`; never one whose process runs."""
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise GlmcError(f"{target}: already exists (choose another path or pass --force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_writer_tag()}+", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Temporaries are named `.NAME.partial-PID@HOST+RANDOM` (folders) and `.NAME.tmp-PID@HOST` (files).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:partial|tmp)-(?P<pid>[0-9]{1,10})@(?P<host>[A-Za-z0-9.-]+)(?:\+.*)?$",
                        re.S)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "localhost"


def _writer_tag() -> str:
    return f"{os.getpid()}@{_host()}"


def temporary_sibling(path: Path) -> Path:
    """Where to write `path` before renaming it into place (`.NAME.tmp-PID@HOST`); stale ones of
    writers that are gone are removed first."""
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    return path.with_name(f".{path.name}.tmp-{_writer_tag()}")


def temporary_writer(entry_name: str) -> tuple[int, str] | None:
    """(pid, host) of the writer a temporary's name records, or None for any other name."""
    match = _TEMPORARY.match(entry_name)
    return (int(match["pid"]), match["host"]) if match else None


def writer_alive(pid: int, host: str) -> bool:
    """Whether the process `pid` on `host` may still run (another host's: assumed to)."""
    if host != _host():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process has: leave it
    return True


def remove_stale_temporaries(folder: Path, name: str | None = None) -> None:
    """Remove the temporaries in `folder` (of `name` only, if given) whose writer is gone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        if writer_alive(int(match["pid"]), match["host"]):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass  # removed meanwhile by another writer, or not ours to remove: harmless


def read_text(path: Path, error: type[GlmcError] = GlmcError, label: str = "",
              max_bytes: int | None = None) -> str:
    """A UTF-8 text file, or one `error` naming it (after `label`, e.g. "--data ").

    With `max_bytes`, a larger file is refused before it is read (a metadata file of
    gigabytes is not metadata)."""
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{label}{path}: {path.stat().st_size:,} bytes, more than the {max_bytes:,} "
                        "such a file may hold")
        return path.read_text(encoding="utf-8")
    except OSError as problem:
        raise error(f"{label}{path}: {problem.strerror or problem}") from None
    except UnicodeDecodeError:
        raise error(f"{label}{path}: not UTF-8 text") from None


MAX_JSON_DEPTH = 32  # configs and manifests nest a few levels; deeper is an attack or an accident


def parse_json(text: str, source: str, error: type[GlmcError] = GlmcError,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON (no NaN or Infinity, no number out of float range, no duplicate keys) nested at most `max_depth` levels,
    or one `error` naming `source`."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    def finite_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"{literal} is out of range")
        return value

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"key {duplicate!r} given twice")
        return dict(pairs)

    try:
        value = json.loads(text, parse_constant=refuse_constant, parse_float=finite_float,
                           object_pairs_hook=no_duplicates)
    except RecursionError:
        raise error(f"{source}: nested deeper than {max_depth} levels") from None
    except ValueError as problem:
        detail = " ".join(str(problem).split())[:200]
        raise error(f"{source}: not valid JSON ({detail})") from None
    if nesting(value) > max_depth:
        raise error(f"{source}: nested deeper than {max_depth} levels")
    return value


def nesting(value: Any) -> int:
    """How deeply lists and dicts nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def read_json(path: Path, error: type[GlmcError] = GlmcError, *, max_bytes: int = 1 << 20,
              label: str = "") -> Any:
    """A bounded, strict JSON file (see `read_text`, `parse_json`)."""
    return parse_json(read_text(path, error, label, max_bytes), f"{label}{path}", error)


MAX_YAML_NODES = 100_000  # values a YAML file may hold with its aliases expanded


def parse_yaml(text: str, source: str, error: type[GlmcError] = GlmcError, *, max_depth: int = MAX_JSON_DEPTH,
               max_nodes: int = MAX_YAML_NODES) -> Any:
    """Safe YAML (plain data, no tags that build objects) as strictly as `parse_json` reads JSON:
    a key given twice in a mapping, nesting deeper than `max_depth`, or aliases expanding to
    more than `max_nodes` values ("billion laughs": a few lines that expand to gigabytes) is
    one `error` naming `source` and the line."""
    import yaml

    def fail(problem: str, mark) -> GlmcError:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return error(f"{source}: not valid YAML{where}: {problem}")

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > max_depth:
                    raise fail(f"nested deeper than {max_depth} levels", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:
                        continue  # an unhashable key: SafeLoader reports it
                    if duplicate:
                        raise fail(f"the key {_cut(repr(key))} is given twice", key_node.start_mark)
            return super().construct_mapping(node, deep)

    loader = None
    try:
        loader = Loader(text)  # the reader refuses unprintable characters (a NUL) already here
        root = loader.get_single_node()
        if root is None:
            return None
        _count_yaml_nodes(root, max_nodes, max_depth, fail)
        return loader.construct_document(root)
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        detail = getattr(problem, "problem", None) or str(problem).splitlines()[0]
        raise fail(_cut(detail), mark) from None
    except RecursionError:
        raise error(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _count_yaml_nodes(root, limit: int, max_depth: int, fail) -> None:
    """Count the values (and the depth) of a composed YAML document with every alias expanded,
    without expanding it: a node reached through several aliases counts once per path, its size
    computed once."""
    import yaml

    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = ([child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            depths[key] = 1 + max((depths[id(child)] for child in children), default=0)
            if sizes[key] > limit:
                raise fail(f"more than {limit:,} values once its aliases are expanded", node.start_mark)
            if depths[key] > max_depth + 1:  # + 1: scalars count as a level here
                raise fail(f"nested deeper than {max_depth} levels once its aliases are expanded",
                           node.start_mark)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise fail("an alias refers to a value that contains it", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite_number(value: Any) -> bool:
    """An int or a finite float (bool excluded: JSON's true is not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
