export CUPY_CACHE_DIR=/tmp/cc PYTHONPATH=. CUPYATTN_COMMIT=d3c9945
timeout 120 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_torch.py > $OUT/tests.txt 2>&1; echo tests rc=$?
tail -2 $OUT/tests.txt
AB_GRIDS=dynamic AB_ROWS="128:4096:128x2|128x3|96x3|96x4|176x2,128:16384:176x2|128x3|96x4,64:4096:128x4x3|128x2x3|128x4" timeout 300 python3 tools/ab_sm90.py > $OUT/ab.txt 2>&1; echo ab rc=$?
sed -n '/^median/,$p' $OUT/ab.txt
