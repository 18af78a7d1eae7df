export CUPY_CACHE_DIR=/tmp/cc PYTHONPATH=. CUPYATTN_COMMIT=23d1f86
AB_GRIDS=dynamic AB_ROWS="64:1024:128x4|128x4x3|128x2x3,64:4096:128x4|192x3|128x4x3|128x2x3,64:16384:192x3|128x4|128x4x3|128x2x3" timeout 200 python3 tools/ab_sm90.py > $OUT/ab.txt 2>&1; echo ab rc=$?
tail -12 $OUT/ab.txt
timeout 280 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_flash_sm90.py > $OUT/tests.txt 2>&1; echo tests rc=$?
tail -4 $OUT/tests.txt
timeout 90 python3 tools/tune_chunked.py --quick --budget > $OUT/chunked.txt 2>&1
grep -E "BUDGET" $OUT/chunked.txt
