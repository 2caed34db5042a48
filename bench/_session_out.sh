# Sourced by bench/gpu_session*.sh: where a session's logs and results go, and how they come back.
#
# The device tool returns at most 8 files from $OUT (16 MiB each). A session writes many more (a log per
# step, each bench's JSON, pytest XML, plots), so they are staged outside $OUT and packed into ONE archive,
# $OUT/session.tgz, after every step (a call cut short still returns what it had), beside $OUT/summary.txt.
# Unpack here with: tar xzf session.tgz   (logs/, results/, runs/)

OUT=${OUT:-$PWD/gpu_session_out}
STAGE=${GPU_SESSION_STAGE:-${TMPDIR:-/tmp}/quantrl_gpu_session.$$}
mkdir -p "$OUT" "$STAGE/logs" "$STAGE/results"

pack_out() { # re-create $OUT/session.tgz from the stage (atomically: the old archive stays until the new is whole)
  if command -v tar >/dev/null; then
    tar czf "$OUT/session.tgz.part" -C "$STAGE" . 2>/dev/null
  else # the same archive through Python's tarfile
    "${PY:-python3}" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "w:gz").add(sys.argv[2], arcname=".")' \
      "$OUT/session.tgz.part" "$STAGE" 2>/dev/null
  fi && mv -f "$OUT/session.tgz.part" "$OUT/session.tgz"
}
