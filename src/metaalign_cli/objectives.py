"""Objectives: plain-language alignment goals loaded from editable YAML files.

An objective is what MetaAligner conditions its correction on (paper section 3.4, Appendix B
Table 4): a short name (``harmless``), a text marker (``Harmless``) and a description. The
released checkpoints were trained on exact strings per dataset template; those live under
``renderings`` and are used verbatim when that template is chosen.

Search order (later overrides earlier, by name): the built-in set shipped in the package,
``$METAALIGN_HOME/objectives`` (default ``~/.config/metaalign/objectives``), each
``--objectives-dir`` and each ``--objective-file``. A file with a new name is a zero-shot
objective, usable at once. A file of the user directory that does not load is skipped with a
warning (it is read by every command, so one broken file must not stop them all); a run that
names the objective it was meant to declare fails with that file's error.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from metaalign_cli.errors import ConfigError, UnknownNameError
from metaalign_cli.yamlfiles import key_where, load_yaml_mapping, schema_error


class Objective(BaseModel):
    """One alignment objective, as written in its YAML file.

    Fields: ``name`` (lower-case id), ``aliases``, ``label`` (text marker, default: the name
    capitalised), ``description`` (required, paper Table 4 wording for the built-ins),
    ``renderings`` (template name -> exact string). ``source`` is the file it came from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    aliases: tuple[str, ...] = ()
    label: str | None = None
    renderings: dict[str, str] = {}
    source: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c in v for c in ", \t\n"):
            raise ValueError("must be a non-empty word without commas or spaces")
        return v.lower()

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @property
    def marker(self) -> str:
        """The text marker shown before the description (``Harmless``)."""
        return self.label or self.name.replace("_", " ").capitalize()

    def render(self, template: str | None = None) -> str:
        """The objective's text for a prompt: the exact rendering for ``template`` when the
        file has one (released checkpoints), else ``"<label>: <description>"`` (Table 4)."""
        if template and template in self.renderings:
            return self.renderings[template]
        return f"{self.marker}: {self.description}"


_OBJECTIVE_KEYS = tuple(k for k in Objective.model_fields if k != "source")  # what a file may hold


def load_objective_file(path: str | Path) -> Objective:
    """Load and validate one objective YAML file.

    Raises ConfigError naming the file and the offending key or line (bad YAML, unknown key,
    missing or empty description, wrong types).
    """
    path = Path(path)
    data = load_yaml_mapping(path, "objective file")
    data.setdefault("name", path.stem)
    unknown = [k for k in data if k not in _OBJECTIVE_KEYS]
    allowed = f" (allowed: {', '.join(_OBJECTIVE_KEYS)})"
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _OBJECTIVE_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else allowed
        raise ConfigError(f"{key_where(path, unknown[0])} unknown key '{unknown[0]}'{hint}")
    if isinstance(data.get("aliases"), str):
        data["aliases"] = [data["aliases"]]
    try:
        return Objective(**data, source=str(path))
    except ValidationError as e:
        raise schema_error(path, e, allowed) from None


def builtin_objectives_dir() -> Path:
    """The objectives shipped inside the package (``metaalign_cli/data/objectives``)."""
    return Path(str(resources.files("metaalign_cli") / "data" / "objectives"))


def user_objectives_dir() -> Path:
    """``$METAALIGN_HOME/objectives``, default ``~/.config/metaalign/objectives``."""
    home = os.environ.get("METAALIGN_HOME")
    base = Path(home) if home else Path.home() / ".config" / "metaalign"
    return base / "objectives"


@dataclass
class ObjectiveSet:
    """All known objectives by name, with alias lookup. Build with :func:`load_objectives`."""

    by_name: dict[str, Objective] = field(default_factory=dict)
    replaced: dict[str, Objective] = field(default_factory=dict)  # name -> the objective a later file replaced
    broken: dict[str, ConfigError] = field(default_factory=dict)  # file stem or name key -> why a user file was skipped

    def add(self, obj: Objective) -> None:
        """Add or override (same name) an objective; what it overrides is kept in ``replaced``."""
        if obj.name in self.by_name:
            self.replaced.setdefault(obj.name, self.by_name[obj.name])
        self.by_name[obj.name] = obj

    def notes(self, objectives: Iterable[Objective], template: str | None = None) -> list[str]:
        """Warnings for the ``objectives`` a run uses, rendered for ``template`` (its name):

        - a file that replaces an objective of the same name (a shipped one) without the
          aliases or exact renderings the replaced one had: those are gone with it;
        - a ``renderings`` key that is not ``template`` but close to it (a misspelt template
          name: the exact string is never used);
        - a file of the user directory that did not load and was skipped (every run says so).

        Returns one line per finding, naming the file; [] when there is nothing to say."""
        out = [f"{e} (skipped: fix or remove the file)" for e in dict.fromkeys(self.broken.values())]
        for o in objectives:
            old = self.replaced.get(o.name)
            if old is not None:
                lost_aliases = [a for a in old.aliases if a not in o.aliases]
                lost_r = [t for t in old.renderings if t not in o.renderings]
                lost = ([f"its aliases {', '.join(lost_aliases)}"] if lost_aliases else []) + \
                       ([f"its exact text for the {', '.join(lost_r)} template(s) (what released correctors were "
                         "trained on)"] if lost_r else [])
                if lost:
                    out.append(f"{o.source}: replaces objective '{o.name}' of {old.source} without "
                               f"{' and '.join(lost)}; copy them into the file to keep them")
            if template and template not in o.renderings:
                close = difflib.get_close_matches(template, list(o.renderings), n=1, cutoff=0.75)
                if close:
                    out.append(f"{o.source}: renderings key '{close[0]}' is not the template in use, "
                               f"'{template}': its text is not used (a misspelt template name?)")
        return out

    def _index(self) -> dict[str, str]:
        idx: dict[str, str] = {}
        for obj in self.by_name.values():
            for a in obj.aliases:
                idx.setdefault(_key(a), obj.name)
        for obj in self.by_name.values():
            idx[_key(obj.name)] = obj.name
        return idx

    def get(self, name: str) -> Objective:
        """Look up by name or alias (case-insensitive, '-' = '_').

        Raises UnknownNameError listing the closest known names, saying so when the name was an
        alias of an objective that a user file replaced without it; ConfigError (that file's
        own error) when the name is a file of the user directory that did not load.
        """
        idx = self._index()
        k = _key(name)
        found = self.by_name[idx[k]] if k in idx else None
        meant = k if found is None else _key(found.name)  # the file stem that would have declared it
        if meant in self.broken and (found is None or found.source.startswith(str(builtin_objectives_dir()))):
            raise ConfigError(f"objective '{name}': {self.broken[meant]}")
        if found is not None:
            return found
        for old in self.replaced.values():
            if any(_key(a) == k for a in old.aliases):
                new = self.by_name[old.name]
                raise UnknownNameError(
                    f"unknown objective '{name}': it is an alias of '{old.name}' in {old.source}, which "
                    f"{new.source} replaces without it (use '{old.name}', or add '{name}' to that file's aliases)")
        score: dict[str, float] = {}
        for key, obj_name in idx.items():  # an objective scores as its closest name or alias
            score[obj_name] = max(score.get(obj_name, 0.0), _likeness(k, key))
        best = max(score.values(), default=0.0)
        close = sorted((n for n, r in score.items() if r >= 0.5 and r >= best - 0.1), key=lambda n: -score[n])[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if name.lower().endswith((".yaml", ".yml")) or "/" in name:  # a file where a name goes
            hint = f"; a YAML file is loaded with --objective-file {name}, then named by its 'name'"
        raise UnknownNameError(
            f"unknown objective '{name}'{hint} (known: {', '.join(sorted(self.by_name))}; "
            "add a YAML file for a new one)")

    def resolve(self, names: str | Iterable[str]) -> list[Objective]:
        """Objectives for a comma-separated string or a list, in the order given, without
        duplicates (a record's ``objectives`` field goes through here as it is). Raises
        UnknownNameError for an unknown name, ValueError when empty or neither a string nor a
        list of strings."""
        if isinstance(names, str):
            names = names.split(",")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected a list of objective names or one comma-separated string, got {names!r}")
        out: list[Objective] = []
        for n in names:
            if not n.strip():
                continue
            obj = self.get(n.strip())
            if obj not in out:
                out.append(obj)
        if not out:
            raise ValueError("no objectives given")
        return out

    def __iter__(self):
        return iter(sorted(self.by_name.values(), key=lambda o: o.name))

    def __len__(self) -> int:
        return len(self.by_name)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _likeness(typed: str, known: str) -> float:
    """difflib's similarity ratio (0-1) of two name keys, on their stems when they share an
    ending of 3 or more letters: "kindness" and "fairness" compare as "kind" and "fair" (0.25, no
    suggestion), "harmlesss" and "harmless" as they are (0.94). A name that starts with another
    letter counts only when it is very close (0.8 or more): "kindnes" suggests nothing, "armless"
    still suggests harmless."""
    n = 0
    while n < min(len(typed), len(known)) - 3 and typed[-1 - n] == known[-1 - n]:
        n += 1
    if n >= 3:
        typed, known = typed[:-n], known[:-n]
    ratio = difflib.SequenceMatcher(None, typed, known).ratio()
    return ratio if typed[:1] == known[:1] or ratio >= 0.8 else 0.0


def load_objectives(dirs: Iterable[str | Path] = (), files: Iterable[str | Path] = (),
                    include_user: bool = True) -> ObjectiveSet:
    """Load the built-in objectives, then the user directory, then ``dirs``, then ``files``.

    Later sources override earlier ones with the same name (a user file named like a built-in
    replaces it, aliases included). A file of the user directory that does not validate is
    skipped and kept in ``broken`` (see :meth:`ObjectiveSet.notes` and :meth:`ObjectiveSet.get`).
    Raises ConfigError for any other file that does not validate, for
    a ``dirs``/``files`` entry that does not exist, for two files of one source (one
    directory, or the ``files``) that declare the same name, and for an alias that two
    objectives share or that is another objective's name (each names both files).
    """
    objset = ObjectiveSet()
    sources: list[Path] = [builtin_objectives_dir()]
    user = user_objectives_dir() if include_user and user_objectives_dir().is_dir() else None
    if user is not None:
        sources.append(user)
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"{d}: " + ("not a directory (use --objective-file for a file)" if d.exists()
                                          else "objectives directory not found"))
        sources.append(d)
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"{f}: objective file not found")
    given = list({Path(f).resolve(): Path(f) for f in files}.values())  # a file given twice counts once
    layers = [(d, sorted(list(d.glob("*.yaml")) + list(d.glob("*.yml")))) for d in sources] + [(None, given)]
    for d, layer in layers:
        if d is not None and d == user:
            _add_user_layer(objset, layer)
            continue
        seen: dict[str, Objective] = {}
        for f in layer:
            obj = load_objective_file(f)
            if obj.name in seen:
                raise ConfigError(f"{obj.source}: objective '{obj.name}' is also declared in {seen[obj.name].source}")
            seen[obj.name] = obj
            objset.add(obj)
    owner: dict[str, Objective] = {_key(o.name): o for o in objset.by_name.values()}
    for obj in objset.by_name.values():
        for a in obj.aliases:
            other = owner.setdefault(_key(a), obj)
            if other is obj:
                continue
            what = "the name" if _key(other.name) == _key(a) else "an alias"
            raise ConfigError(f"{obj.source}: alias '{a}' is also {what} of objective '{other.name}' ({other.source})")
    return objset


def _add_user_layer(objset: ObjectiveSet, files: list[Path]) -> None:
    """Add the objective files of the user directory to ``objset``, skipping (into
    ``objset.broken``, under the file's stem and the name it declares) each that does not
    validate, declares a name another of them declares too (both), or has an alias that is the
    name or an alias of another objective: one bad file there must not stop every command."""
    import yaml

    loaded: list[Objective] = []
    for f in files:
        try:
            loaded.append(load_objective_file(f))
        except ConfigError as e:
            objset.broken[_key(f.stem)] = e
            try:  # the name it meant to declare, so that naming it points here
                raw = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                raw = None
            if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"].strip():
                objset.broken.setdefault(_key(raw["name"]), e)
    by_name: dict[str, list[Objective]] = {}
    for obj in loaded:
        by_name.setdefault(obj.name, []).append(obj)
    kept = []
    for name, objs in by_name.items():
        if len(objs) > 1:
            err = ConfigError(f"{objs[1].source}: objective '{name}' is also declared in {objs[0].source}")
            for o in objs:
                objset.broken[_key(Path(o.source).stem)] = err
            objset.broken[_key(name)] = err
        else:
            kept.append(objs[0])
    present = {**objset.by_name, **{o.name: o for o in kept}}
    for obj in kept:
        others = [o for o in present.values() if o is not obj]
        clash = next(((a, o) for a in obj.aliases for o in others
                      if _key(a) in {_key(o.name), *map(_key, o.aliases)}), None)
        if clash is None:
            objset.add(obj)
            continue
        a, other = clash
        what = "the name" if _key(other.name) == _key(a) else "an alias"
        err = ConfigError(f"{obj.source}: alias '{a}' is also {what} of objective '{other.name}' ({other.source})")
        objset.broken[_key(Path(obj.source).stem)] = err
        objset.broken.setdefault(_key(obj.name), err)
        present.pop(obj.name)
        if obj.name in objset.by_name:
            present[obj.name] = objset.by_name[obj.name]


def render_objectives(objectives: Iterable[Objective], template: str | None = None,
                      sep: str = "; ") -> str:
    """The ``{aspects}`` text: each objective's rendering for ``template``, joined by ``"; "``
    in the given order (paper section 3.1, the O in T(q, y, O, t))."""
    return sep.join(o.render(template) for o in objectives)
