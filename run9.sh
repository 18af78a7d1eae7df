export CUPY_CACHE_DIR=/tmp/cc PYTHONPATH=. CUPYATTN_COMMIT=edb5747
timeout 170 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_flash_sm90.py > $OUT/tests.txt 2>&1; echo tests rc=$?
tail -2 $OUT/tests.txt
timeout 60 python3 bench/attention.py --group headline --op fwd --backend flash,torch-flash,torch-cudnn --budget 0.15 --no-progress --no-plots --out $OUT/flash_fwd.json > $OUT/flash_fwd.txt 2>&1; echo bench rc=$?
sed -n '/^Summary/,$p' $OUT/flash_fwd.txt
AB_GRIDS=dynamic AB_SWIZZLE="0,8" AB_ROWS="128:4096:128x2,256:4096:64x2,64:4096:128x4x3,128:16384:176x2,64:16384:128x4x3" timeout 90 python3 tools/ab_sm90.py > $OUT/ab.txt 2>&1; echo ab rc=$?
sed -n '/^median/,$p' $OUT/ab.txt
