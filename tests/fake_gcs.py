"""A fake `gs://` file system for tests: etils.epath's backends patched so that every
`gs://BUCKET/...` path is served from a local folder (local paths pass through). What vljax writes
through epath to a gs:// workdir then lands in that folder, where a test can read it."""
import contextlib
import pathlib

from etils.epath import backend, testing

_LOCAL = backend.os_backend


@contextlib.contextmanager
def fake_gcs(root):
    root = pathlib.Path(root)
    touched = []

    def local(path):
        s = str(path)
        if s.startswith("gs://"):
            touched.append(s)
            return str(root / s[len("gs://"):])
        return s

    def one(name):
        return lambda _original, path, *args, **kwargs: getattr(_LOCAL, name)(local(path), *args, **kwargs)

    def two(name):
        return lambda _original, path, dst, *args, **kwargs: getattr(_LOCAL, name)(
            local(path), local(dst), *args, **kwargs)

    def glob(_original, pattern):
        return ["gs://" + str(pathlib.Path(p).relative_to(root)) if str(pattern).startswith("gs://") else p
                for p in _LOCAL.glob(local(pattern))]

    def listdir(_original, path):
        return _LOCAL.listdir(local(path))

    with testing.mock_epath(
            open=one("open"), exists=one("exists"), isdir=one("isdir"), listdir=listdir, glob=glob,
            makedirs=one("makedirs"), mkdir=one("mkdir"), remove=one("remove"), rmtree=one("rmtree"),
            stat=one("stat"), walk=one("walk"), rename=two("rename"), replace=two("replace"),
            copy=two("copy")):
        yield touched
