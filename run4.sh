export CUPY_CACHE_DIR=/tmp/cc PYTHONPATH=. CUPYATTN_COMMIT=87e53ed
timeout 330 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests > $OUT/tests.txt 2>&1; echo tests rc=$?
tail -4 $OUT/tests.txt
for tool in memcheck racecheck synccheck; do
  timeout 80 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitizer_case.py > $OUT/san_$tool.txt 2>&1; echo $tool rc=$?
  tail -2 $OUT/san_$tool.txt
done
