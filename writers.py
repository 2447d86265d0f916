"""Who writes a folder, so that nothing is lost (plumbing): an out_dir or a dataset has one writer
at a time (writing: the mark writer.<pid>, a lock), files are written as NAME.tmp.<pid> and
renamed into place, and what writers killed mid-write left behind is cleaned up or finished
(dead_writer). A checkpoint that is not resumed is moved aside (set_aside), never destroyed.
Before the work: a folder can be made and written (check_writable; folder_error says why not),
a path given as a file to read is one (check_file).
Imports: model <- writers <- common, data/, train.py, distill.py, study.py."""
import glob
import os
import tempfile
import time
from contextlib import contextmanager, suppress

from model import UserError


def check_file(path, what, hint=''):
    """A one-line error unless path is a file to read: not found, a folder, a link to nowhere."""
    if not os.path.isfile(path):
        why = (f" {path} is a directory, not a file" if os.path.isdir(path) else
               f" {path} is a link that leads nowhere (broken, or a loop)" if os.path.islink(path)
               else f" not found: {path}")
        raise UserError(what + why + (f"; {hint}" if hint else ''))


def dead_writer(path, mine=False):
    """Whether the writer of temp file `path` (NAME.<pid>) is surely dead: only a dead writer's
    files are cleaned up. mine: this process's pid counts as dead (an earlier process's). A mark
    (leave_mark) also names its writer's start time: a live process that reused the id is not
    the writer."""
    pid = path.rsplit('.', 1)[1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return pid.isdigit() and mine
    if os.name != 'posix':
        return False  # no cheap check elsewhere: never touch another writer's files
    try:
        os.kill(int(pid), 0)  # (signal 0: only asks whether the process exists)
    except OSError as e:  # (a PermissionError: alive, another user's)
        return isinstance(e, ProcessLookupError)
    if os.path.basename(path).split('.')[0] in ('writer', 'switch'):  # a mark: is pid reused?
        with suppress(OSError), open(path) as f:
            started, now = f.read(64), start_time(pid)
            return bool(started and now) and started != now
    return False


def start_time(pid):
    """When process pid started (Linux: field 22 of /proc/<pid>/stat), '' where unknown."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return ''


def leave_mark(path):
    """Create the mark path (NAME.<our pid>) holding our start time, for dead_writer."""
    with open(path, 'w') as f:
        f.write(start_time(os.getpid()))


def remove_stale_temps(path, mine=False):
    """Delete the path.tmp.<pid> files of writers killed mid-save (each as big as a checkpoint)."""
    for tmp in glob.glob(glob.escape(path) + '.tmp.*'):
        if dead_writer(tmp, mine):
            with suppress(OSError):
                os.remove(tmp)


def folder_error(folder, what, error):
    """The one-line error of a folder that cannot be made or written: what stands there, else
    the system's reason."""
    why = ('a link that leads nowhere (broken, or a loop)' if os.path.islink(folder) and
           not os.path.exists(folder) else 'a file, not a folder' if os.path.isfile(folder)
           else error.strerror or error)
    return UserError(f"cannot write to {what} {folder}: {why}")


def check_writable(folder, what):
    """Before the work: a one-line error unless folder can be made and written. A file is made
    and removed at once in it, or in its nearest existing ancestor: nothing is left behind."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise folder_error(folder, what, e) if existing == os.path.abspath(folder) else \
            UserError(f"cannot write to {what} {folder}: {existing} is not a writable folder")


def check_out_dir(out_dir):
    """Before training: out_dir can be written; dead checkpoint writers' temp files are removed."""
    check_writable(out_dir, 'out_dir')
    remove_stale_temps(os.path.join(out_dir, 'ckpt.pt'))


def set_aside(path, say=print):
    """A run that does not resume the checkpoint at path never destroys it: it moves aside."""
    if os.path.exists(path):
        stem = os.path.join(os.path.dirname(path), time.strftime('ckpt.replaced-%Y%m%d-%H%M%S'))
        names = (f"{stem}{f'.{n}' if n else ''}.pt" for n in range(10 ** 6))
        aside = next(name for name in names if not os.path.exists(name))
        os.replace(path, aside)
        say(f"note: the checkpoint {path} was not resumed: it is moved to {aside}")


@contextmanager
def writing(folder, what):
    """Own folder (an out_dir, a dataset) while this process writes it: the mark writer.<pid> in
    it. Another live writer's mark is a one-line error naming its process; a dead one's is taken."""
    created, mine = not os.path.isdir(folder), os.path.join(folder, f'writer.{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        leave_mark(mine)  # (first: of two writers starting together, both see the other)
    except OSError as e:
        raise folder_error(folder, what, e)
    try:
        for mark in set(glob.glob(os.path.join(glob.escape(folder), 'writer.*'))) - {mine}:
            if not dead_writer(mark):
                pid = mark.rsplit('.', 1)[1]
                raise UserError(f"{what} {folder} is being written by process {pid} ({mark}): "
                                f"wait for it, or pick another {what}")
            with suppress(OSError):
                os.remove(mark)
        yield
    finally:
        with suppress(OSError):
            os.remove(mine)
            if created:
                os.rmdir(folder)  # (only if still empty: a failed run leaves nothing behind)
