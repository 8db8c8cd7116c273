"""Jobs, applications and workflows, as legacy Balsam's ``balsam.launcher.dag`` offered them.

::

    from balsam.launcher.dag import BalsamJob, add_job, add_dependency

    A = add_job(name="A", workflow="demo", application="generate")
    B = add_job(name="B", workflow="demo", application="simulate", input_files="B.inp")
    add_dependency(A, B)
    BalsamJob.objects.filter(workflow="demo", state="JOB_FINISHED").update(state="RESTART_READY")

Queries run as SQL in the database (nothing is filtered in Python), on whatever database
``BALSAM_DB_PATH`` names, SQLite or PostgreSQL. Every change goes through the same store, the
same checks and the same state machine as the ``balsam`` command, and bad input raises an
exception (see :mod:`balsam.exceptions`) with the command's message, leaving the database as
it was.

Inside a running job, or its pre- or postprocess script, ``current_job`` is the job
(``BALSAM_JOB_ID``); ``parents`` and ``children`` are its parents and children. Elsewhere they
are ``None``.
"""

import json
import os
import sys

from .. import _native
from ..exceptions import DoesNotExist, FieldError, RefusedError

__all__ = [
    "BalsamJob",
    "ApplicationDefinition",
    "QuerySet",
    "add_job",
    "add_dependency",
    "spawn_child",
    "kill",
    "current_job",
    "parents",
    "children",
]

_FIELD_INFO = _native.job_fields()
_ALL_FIELDS = tuple(name for name, _, _ in _FIELD_INFO)
_SETTABLE = frozenset(name for name, _, settable in _FIELD_INFO if settable)
_DEFAULTS = _native.job_defaults()
_END_STATES = ("JOB_FINISHED", "FAILED", "USER_KILLED")

# One line for each field, for help(BalsamJob).
_FIELD_DOCS = {
    "job_id": "The job's id (a UUID, as text); any unique prefix finds it with balsam commands.",
    "workflow": "Workflow label, used to filter launchers and listings.",
    "name": "Job name; with the id's first 8 characters it names the working directory.",
    "description": "Free text.",
    "input_files": "Glob patterns of parents' files to copy into the working directory (ln:PATTERN links).",
    "stage_in_url": "A file or directory copied into the working directory before the run.",
    "stage_out_files": "Glob patterns of files to copy out after the run.",
    "stage_out_url": "Where stage-out copies to.",
    "wall_time_minutes": "Expected run time, minutes.",
    "num_nodes": "Nodes for an MPI job.",
    "coschedule_num_nodes": "Extra nodes to reserve beside the job's own.",
    "ranks_per_node": "MPI ranks per node.",
    "cpu_affinity": "'none' or 'depth' (aprun -cc).",
    "threads_per_rank": "OpenMP threads per rank (aprun -d).",
    "threads_per_core": "Hardware threads per core (aprun -j).",
    "node_packing_count": "A serial job uses 1/node_packing_count of a node.",
    "environ_vars": "Extra environment, 'A=1:B=2' (a dict works too).",
    "mpi_flags": "Extra flags for the MPI launch command.",
    "application": "Name of a registered application (ApplicationDefinition).",
    "args": "Appended to the application's executable.",
    "user_workdir": "Overrides the working directory.",
    "wait_for_parents": "Wait for parents to finish before running.",
    "post_error_handler": "Run the postprocess script on RUN_ERROR, with BALSAM_JOB_ERROR=TRUE.",
    "post_timeout_handler": "Run the postprocess script on RUN_TIMEOUT, with BALSAM_JOB_TIMEOUT=TRUE.",
    "auto_timeout_retry": "A timed-out job is run again automatically.",
    "max_restarts": "How many times the job may be restarted before it is FAILED.",
    "data": "Free-form user data, a dict.",
    "state": "The job's state (CREATED ... JOB_FINISHED); set it and save() to change it.",
    "return_code": "Exit code of the last run (None until it ran). Kept by the launcher.",
    "num_restarts": "Restarts so far. Kept by the store.",
    "queued_launch_id": "The launch (batch job) the job was scheduled into, if any.",
    "lease_session": "The launcher session holding the job, if any.",
}


def _interactive():
    """Whether a person types at Python's prompt (``>>>``, ``python -i``), as opposed to a
    program running: the Python side of the CLI's "a person at a terminal" rule."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def _id_of(job):
    """A job id from a BalsamJob, a UUID or text."""
    if isinstance(job, BalsamJob):
        if job._pk is None:
            raise RefusedError(f"{job!r} is not saved yet: save() it first")
        return job.job_id
    return str(job)


class _JobField:
    """A job field as an attribute: the value loaded or set, else legacy's default."""

    def __init__(self, name, settable):
        self.name = name
        self.settable = settable
        self.__doc__ = _FIELD_DOCS.get(name, name)

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        f = obj._f
        try:
            return f[self.name]
        except KeyError:
            pass
        if self.name == "job_id":
            # Known before the job is saved, as legacy's were, so jobs can refer to it.
            value = f[self.name] = _native.new_job_id()
            return value
        value = _DEFAULTS[self.name]
        if isinstance(value, dict):
            # A mutable default is kept, so that `job.data["k"] = 1` sticks.
            value = f[self.name] = dict(value)
        return value

    def __set__(self, obj, value):
        if not self.settable:
            raise FieldError(f"{self.name} cannot be set: {_FIELD_DOCS[self.name]}")
        obj._f[self.name] = value
        if obj._dirty is None:
            obj._dirty = set()
        obj._dirty.add(self.name)


class BalsamJob:
    """One planned application run: a row of the job table.

    ``BalsamJob(**fields)`` makes a job in memory; ``save()`` adds it to the database (or, for
    a job read from it, writes the fields you changed). Every field is an attribute; fields
    you do not give take legacy Balsam's defaults. ``BalsamJob.objects`` queries the table::

        BalsamJob.objects.filter(num_nodes__lte=128, name__contains="test",
                                 state="JOB_FINISHED").update(state="RESTART_READY")

    Fields: job_id, workflow, name, description, input_files, stage_in_url,
    stage_out_files, stage_out_url, wall_time_minutes, num_nodes, coschedule_num_nodes,
    ranks_per_node, cpu_affinity, threads_per_rank, threads_per_core, node_packing_count,
    environ_vars, mpi_flags, application, args, user_workdir, wait_for_parents,
    post_error_handler, post_timeout_handler, auto_timeout_retry, max_restarts, data, state,
    and, kept by the system, return_code, num_restarts, queued_launch_id, lease_session.
    """

    __slots__ = ("_f", "_pk", "_dirty", "_data0")

    DoesNotExist = DoesNotExist

    def __init__(self, **fields):
        for k in fields:
            if k in _SETTABLE or k == "job_id":
                continue
            if k == "state":
                raise RefusedError("a new job starts CREATED: save() it first, then set its state")
            if k in _ALL_FIELDS:
                raise FieldError(f"{k} cannot be set: {_FIELD_DOCS[k]}")
            raise FieldError(f"unknown job field {k!r}; job fields are: {', '.join(_ALL_FIELDS)}")
        self._f = fields
        self._pk = None
        self._dirty = None
        self._data0 = None

    @classmethod
    def _from_native(cls, d):
        job = cls.__new__(cls)
        job._pk = d.pop("pk")
        job._f = d
        job._dirty = None
        job._data0 = json.dumps(d["data"], sort_keys=True)
        return job

    def _load(self, d):
        self._pk = d.pop("pk")
        self._f = d
        self._dirty = None
        self._data0 = json.dumps(d["data"], sort_keys=True)

    @property
    def pk(self):
        """The job's row number in the database (None until saved)."""
        return self._pk

    def save(self):
        """Add the job to the database, or write the fields changed since it was read.

        A new job is checked (fields, application, id) and added CREATED, with its history's
        first line. For a job read from the database only the fields you set are written, in
        one transaction; a new ``state`` is recorded in the job's history as ``balsam modify``
        records it. A killed job (USER_KILLED) cannot be changed.
        """
        if self._pk is None:
            d = dict(self._f)
            d.setdefault("job_id", self.job_id)
            self._load(_native.add_job(d))
            return
        changes = {k: self._f[k] for k in (self._dirty or ())}
        if "data" in self._f and json.dumps(self._f["data"], sort_keys=True) != self._data0:
            changes["data"] = self._f["data"]
        if not changes:
            return
        q = _native.JobQuery().filter(job_id=self.job_id)
        if q.update(changes, reset_restarts=_interactive()) == 0:
            raise DoesNotExist(f"job {self.job_id} is no longer in the database")
        self.refresh_from_db()

    def refresh_from_db(self):
        """Read the job again from the database (its state may have changed)."""
        if self._pk is None:
            raise RefusedError("this job is not saved yet")
        found = _native.jobs_by_pks([self._pk])
        if not found:
            raise DoesNotExist(f"job {self.job_id} is no longer in the database")
        self._load(found[0])

    def delete(self):
        """Remove the job, its history and its edges (as ``balsam rm jobs --id``)."""
        if self._pk is None:
            return 0
        n = _native.JobQuery().filter(job_id=self.job_id).delete()
        self._pk = None
        return n

    @property
    def state_history(self):
        """The job's history, one line per state change, as ``balsam ls --history`` shows it:
        ``[MM-DD-YYYY HH:MM:SS.ffffff STATE] message`` (UTC)."""
        if self._pk is None:
            return ""
        return "\n".join(_native.history(self._pk))

    @property
    def working_directory(self):
        """Where the job runs: ``user_workdir``, or ``data/{workflow}/{name}_{id8}`` in the
        database directory."""
        return _native.workdir(self.user_workdir, self.workflow, self.name, self.job_id)

    def read_file_in_workdir(self, fname):
        """The text of a file in the job's working directory (e.g. ``f"{job.name}.out"``)."""
        with open(os.path.join(self.working_directory, fname)) as f:
            return f.read()

    def get_parents(self):
        """The job's parents, as a query."""
        if self._pk is None:
            return QuerySet(BalsamJob, _native.JobQuery().filter(job_id__in=[]))
        return QuerySet(BalsamJob, _native.JobQuery.parents_of(self._pk))

    def get_children(self):
        """The job's children, as a query."""
        if self._pk is None:
            return QuerySet(BalsamJob, _native.JobQuery().filter(job_id__in=[]))
        return QuerySet(BalsamJob, _native.JobQuery.children_of(self._pk))

    @property
    def cute_id(self):
        """``[name | id8]``, how logs refer to the job."""
        return f"[{self.name} | {self.job_id[:8]}]"

    @property
    def num_ranks(self):
        """MPI ranks in all: num_nodes × ranks_per_node."""
        return self.num_nodes * self.ranks_per_node

    def __repr__(self):
        return f"<BalsamJob {self.cute_id} {self.state}>"

    def __str__(self):
        lines = [f"BalsamJob {self.job_id}", "-----"]
        for name in _ALL_FIELDS:
            if name != "job_id":
                lines.append(f"{name}: {getattr(self, name)}")
        return "\n".join(lines)

    def __eq__(self, other):
        return isinstance(other, BalsamJob) and other.job_id == self.job_id

    def __hash__(self):
        return hash(self.job_id)


for _name, _kind, _settable in _FIELD_INFO:
    setattr(BalsamJob, _name, _JobField(_name, _settable or _name == "state"))
del _name, _kind, _settable


class ApplicationDefinition:
    """A registered application: what a job runs (``balsam app``).

    ``ApplicationDefinition(name=..., executable=..., preprocess=..., postprocess=...)`` and
    ``save()``; ``ApplicationDefinition.objects`` queries them as ``BalsamJob.objects`` does
    jobs. ``executable`` is a command line (``echo Hello,``); a ``.py`` path is run with
    python3. ``preprocess`` runs once before the first run, ``postprocess`` after the run.
    """

    _FIELDS = ("id", "name", "description", "executable", "preprocess", "postprocess", "envscript")
    __slots__ = _FIELDS + ("_saved",)

    DoesNotExist = DoesNotExist

    def __init__(self, **fields):
        for k in fields:
            if k not in self._FIELDS or k == "id":
                raise FieldError(
                    f"unknown application field {k!r}; application fields are: "
                    + ", ".join(self._FIELDS[1:])
                )
        self.id = None
        for k in self._FIELDS[1:]:
            setattr(self, k, fields.get(k, ""))
        self._saved = None

    @classmethod
    def _from_native(cls, d):
        app = cls.__new__(cls)
        for k in cls._FIELDS:
            setattr(app, k, d[k])
        app._saved = dict(d)
        return app

    def save(self):
        """Register the application, or write the fields changed since it was read."""
        if self._saved is None:
            d = _native.add_app({k: getattr(self, k) for k in self._FIELDS[1:]})
        else:
            changes = {
                k: getattr(self, k)
                for k in self._FIELDS[1:]
                if getattr(self, k) != self._saved[k]
            }
            if changes:
                _native.AppQuery().filter(id=self.id).update(changes)
            d = _native.AppQuery().filter(id=self.id).fetch()
            if not d:
                raise DoesNotExist(f"application {self.name!r} is no longer in the database")
            d = d[0]
        for k in self._FIELDS:
            setattr(self, k, d[k])
        self._saved = dict(d)

    def delete(self, force=False):
        """Remove the application (as ``balsam rm apps``): refused while jobs use it, unless
        ``force``."""
        return len(_native.AppQuery().filter(id=self.id).delete(force=force))

    def __repr__(self):
        return f"<ApplicationDefinition {self.name!r}: {self.executable}>"

    def __eq__(self, other):
        return isinstance(other, ApplicationDefinition) and other.id == self.id is not None

    def __hash__(self):
        return hash(("app", self.id))


class QuerySet:
    """Jobs (or applications) that match a query. Lazy: nothing is read until you iterate,
    index, count or change them, and each of those runs SQL in the database.

    Chain ``filter(**lookups)``, ``exclude(**lookups)``, ``order_by(*fields)`` and slices.
    A lookup is ``field`` or ``field__lookup`` with lookup one of ``exact``, ``iexact``,
    ``contains``, ``icontains``, ``startswith``, ``in``, ``lt``, ``lte``, ``gt``, ``gte``.
    """

    __slots__ = ("_model", "_q")

    def __init__(self, model, q):
        self._model = model
        self._q = q

    def _jobs(self):
        return self._model is BalsamJob

    def all(self):
        """This query (a copy)."""
        return QuerySet(self._model, self._q)

    def filter(self, **lookups):
        """Rows for which every lookup holds."""
        return QuerySet(self._model, self._q.filter(**_values(lookups)))

    def exclude(self, **lookups):
        """Rows for which not every lookup holds."""
        return QuerySet(self._model, self._q.exclude(**_values(lookups)))

    def order_by(self, *fields):
        """Ordered by these fields; ``-field`` for descending. Ties keep creation order."""
        return QuerySet(self._model, self._q.order_by(list(fields)))

    def count(self):
        """How many rows match (SQL ``count``)."""
        return self._q.count()

    def __len__(self):
        return self._q.count()

    def exists(self):
        """Whether any row matches."""
        return self._q.slice(0, 1).count() > 0

    def __bool__(self):
        return self.exists()

    def __iter__(self):
        if not self._jobs():
            for d in self._q.fetch():
                yield self._model._from_native(d)
            return
        # The matching rows are found once; the jobs are read in pages, so that walking a
        # million jobs never holds them all.
        pks = self._q.pks()
        page = 2000
        for i in range(0, len(pks), page):
            for d in _native.jobs_by_pks(pks[i : i + page]):
                yield BalsamJob._from_native(d)

    def __getitem__(self, key):
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError("slices of a query take no step")
            start = 0 if key.start is None else key.start
            if start < 0 or (key.stop is not None and key.stop < 0):
                raise ValueError("negative indexing is not supported on queries")
            return QuerySet(self._model, self._q.slice(start, key.stop))
        if not isinstance(key, int):
            raise TypeError(f"query indices must be integers or slices, not {type(key).__name__}")
        if key < 0:
            raise ValueError("negative indexing is not supported on queries")
        found = self._q.slice(key, key + 1).fetch()
        if not found:
            raise IndexError("query index out of range")
        return self._model._from_native(found[0])

    def first(self):
        """The first row (by the query's order, else creation order), or None."""
        found = self._q.slice(0, 1).fetch()
        return self._model._from_native(found[0]) if found else None

    def get(self, **lookups):
        """The one row matching the lookups; DoesNotExist if none, RefusedError if several."""
        qs = self.filter(**lookups)
        found = qs._q.slice(0, 2).fetch()
        if not found:
            raise DoesNotExist(f"no {self._model.__name__} matches {lookups}")
        if len(found) > 1:
            raise RefusedError(f"more than one {self._model.__name__} matches {lookups}")
        return self._model._from_native(found[0])

    def values_list(self, *fields, flat=False):
        """A list of tuples of the given fields of each row (of single values with
        ``flat=True`` and one field). Only those columns are read."""
        if flat and len(fields) != 1:
            raise TypeError("values_list(flat=True) takes exactly one field")
        if self._jobs():
            rows = self._q.values(list(fields) or list(_ALL_FIELDS))
        else:
            names = list(fields) or list(ApplicationDefinition._FIELDS)
            for n in names:
                if n not in ApplicationDefinition._FIELDS:
                    raise FieldError(
                        f"unknown application field {n!r}; application fields are: "
                        + ", ".join(ApplicationDefinition._FIELDS)
                    )
            rows = [tuple(d[n] for n in names) for d in self._q.fetch()]
        if flat:
            return [r[0] for r in rows]
        return rows

    def update(self, **fields):
        """Set fields of every matching row in one transaction; returns how many.

        For jobs, each value is checked as ``balsam modify`` checks it, and a ``state`` is set
        as ``balsam modify ID state S`` sets it: through the state machine, with a line in
        each job's history ("User mutated state from Python"). Moving a job that has run to
        RESTART_READY counts toward its ``max_restarts`` when a program does it (past the
        bound the job is FAILED, as a restarting error handler would make it), and starts the
        count again when a person does it at Python's interactive prompt, as the CLI's rule
        for scripts and terminals. If a matching job is USER_KILLED nothing is changed.
        """
        if self._jobs():
            return self._q.update(_values(fields), reset_restarts=_interactive())
        return self._q.update(fields)

    def delete(self):
        """Remove every matching row, by ``balsam rm``'s rules; returns how many. Jobs go with
        their history and edges; children waiting for a removed parent are checked again.
        Applications still used by jobs are not removed."""
        if self._jobs():
            return self._q.delete()
        return len(self._q.delete())

    def __repr__(self):
        shown = list(self[:21])
        more = ", ..." if len(shown) > 20 else ""
        return f"<QuerySet {shown[:20]!r}{more}>"


def _values(d):
    """Lookup or field values as the store takes them (jobs as their ids)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (BalsamJob, ApplicationDefinition)):
            v = v.job_id if isinstance(v, BalsamJob) else v.name
        elif isinstance(v, (list, tuple, set, frozenset)):
            v = [x.job_id if isinstance(x, BalsamJob) else x for x in v]
        out[k] = v
    return out


class _JobManager:
    """``BalsamJob.objects``: the queries, and ``bulk_create``."""

    def _all(self):
        return QuerySet(BalsamJob, _native.JobQuery())

    def all(self):
        """Every job."""
        return self._all()

    def filter(self, **lookups):
        """Jobs for which every lookup holds (see :class:`QuerySet`)."""
        return self._all().filter(**lookups)

    def exclude(self, **lookups):
        """Jobs for which not every lookup holds."""
        return self._all().exclude(**lookups)

    def order_by(self, *fields):
        """Every job, ordered by these fields."""
        return self._all().order_by(*fields)

    def get(self, **lookups):
        """The one job matching the lookups."""
        return self._all().get(**lookups)

    def count(self):
        """How many jobs there are."""
        return self._all().count()

    def first(self):
        """The oldest job, or None."""
        return self._all().first()

    def values_list(self, *fields, flat=False):
        """values_list over every job."""
        return self._all().values_list(*fields, flat=flat)

    def update(self, **fields):
        """update over every job."""
        return self._all().update(**fields)

    def delete(self):
        """Remove every job."""
        return self._all().delete()

    def create(self, **fields):
        """Make and save one job."""
        job = BalsamJob(**fields)
        job.save()
        return job

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return self.count()

    def bulk_create(self, jobs):
        """Add many unsaved jobs in one transaction, as ``balsam job --from-file`` does: every
        job is checked, and one bad job (a field, an unknown application or parent, an id
        already present) adds none; the error names its position (``bulk_create:N``).
        Returns the jobs, now saved (their ids are known before the call)."""
        jobs = list(jobs)
        rows = []
        for j in jobs:
            if not isinstance(j, BalsamJob):
                raise TypeError(f"bulk_create takes BalsamJob objects, not {type(j).__name__}")
            if j._pk is not None:
                raise RefusedError(f"{j!r} is already in the database")
            f = j._f
            if "job_id" not in f:
                f["job_id"] = _native.new_job_id()
            rows.append(f)
        pks = _native.add_jobs(rows)
        for j, pk in zip(jobs, pks):
            j._pk = pk
            j._dirty = None
        return jobs


class _AppManager:
    """``ApplicationDefinition.objects``: the queries."""

    def _all(self):
        return QuerySet(ApplicationDefinition, _native.AppQuery())

    def all(self):
        """Every application."""
        return self._all()

    def filter(self, **lookups):
        """Applications for which every lookup holds."""
        return self._all().filter(**lookups)

    def exclude(self, **lookups):
        """Applications for which not every lookup holds."""
        return self._all().exclude(**lookups)

    def order_by(self, *fields):
        """Every application, ordered by these fields."""
        return self._all().order_by(*fields)

    def get(self, **lookups):
        """The one application matching the lookups."""
        return self._all().get(**lookups)

    def count(self):
        """How many applications there are."""
        return self._all().count()

    def first(self):
        """The first registered application, or None."""
        return self._all().first()

    def values_list(self, *fields, flat=False):
        """values_list over every application."""
        return self._all().values_list(*fields, flat=flat)

    def update(self, **fields):
        """update over every application."""
        return self._all().update(**fields)

    def delete(self):
        """Remove every application no job uses."""
        return self._all().delete()

    def create(self, **fields):
        """Make and save one application."""
        app = ApplicationDefinition(**fields)
        app.save()
        return app

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return self.count()


BalsamJob.objects = _JobManager()
ApplicationDefinition.objects = _AppManager()


def add_job(**fields):
    """Add a job with these fields and return it (saved, CREATED)."""
    job = BalsamJob(**fields)
    job.save()
    return job


def add_dependency(parent, child):
    """Make ``child`` wait for ``parent`` (jobs, ids or unique id prefixes), as ``balsam dep``:
    a dependency that would make a cycle raises CycleError, a duplicate RefusedError, and a
    child past AWAITING_PARENTS cannot get new parents."""
    _native.add_dependency(_id_of(parent), _id_of(child))


def spawn_child(**fields):
    """Add a child of the current job (legacy's ``spawn_child``, the CLI's ``mkchild``): a
    copy of it (workflow, application, resources...) named ``{name}_child`` with empty
    ``data``, with ``fields`` on top, that waits for it. Only inside a running job or its
    scripts (``BALSAM_JOB_ID``)."""
    parent = _current_job()
    if parent is None:
        raise RefusedError(
            "spawn_child makes a child of the current job, but BALSAM_JOB_ID is not set: "
            "call it inside a job or its pre/postprocess script, or use add_job and "
            "add_dependency"
        )
    base = {k: getattr(parent, k) for k in _SETTABLE}
    base["name"] = f"{parent.name}_child"
    base["data"] = {}
    base.update(fields)
    child = BalsamJob(**base)
    child._f["parents"] = [parent.job_id]
    child.save()
    return child


def kill(job, recursive=False):
    """Kill a job (a BalsamJob, an id or a unique id prefix) as ``balsam killjob`` does:
    USER_KILLED (and its descendants with ``recursive``); a launcher running it stops the
    process. Jobs already ended are left alone. Returns the ids of the jobs killed."""
    if isinstance(job, BalsamJob):
        pk = job.pk
        if pk is None:
            raise RefusedError(f"{job!r} is not saved yet")
    else:
        pk = _native.job(str(job))["pk"]
    killed = _native.kill(pk, recursive)
    if isinstance(job, BalsamJob):
        job.refresh_from_db()
    return killed


_current = {}


def _current_job():
    """The job named by BALSAM_JOB_ID (read once per id), or None."""
    job_id = os.environ.get("BALSAM_JOB_ID", "")
    if not job_id:
        return None
    if job_id not in _current:
        _current.clear()
        _current[job_id] = BalsamJob._from_native(_native.job(job_id))
    return _current[job_id]


def __getattr__(name):
    # current_job, parents and children follow the environment: a module attribute read
    # when asked for, not when the module was imported.
    if name == "current_job":
        return _current_job()
    if name in ("parents", "children"):
        job = _current_job()
        if job is None:
            return None
        return job.get_parents() if name == "parents" else job.get_children()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
