set -x
export CUPY_CACHE_DIR=/tmp/cc PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt
AB_GRIDS=dynamic AB_ROWS="64:1024:128x4,64:4096:128x4,128:4096:128x2,256:4096:64x2,64:16384:192x3,128:16384:176x2,256:16384:64x2,64:4096:192x3,128:4096:176x2" timeout 280 python3 tools/ab_sm90.py ab_main.cu ab_nopoly.cu ab_poly2.cu > $OUT/ab.txt 2>&1
timeout 200 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_flash_sm90.py tests/test_flash.py tests/test_properties.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
timeout 100 python3 tools/tune_chunked.py --quick --causal > $OUT/chunked.txt 2>&1
tail -5 $OUT/ab.txt $OUT/chunked.txt
