export CUPY_CACHE_DIR=/tmp/cc PYTHONPATH=. CUPYATTN_COMMIT=0eb58dc
timeout 240 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_chunked.py tests/test_properties.py tests/test_gradients.py tests/test_errors.py > $OUT/tests.txt 2>&1; echo tests rc=$?
tail -3 $OUT/tests.txt
timeout 90 python3 tools/tune_chunked.py --quick --causal > $OUT/chunked.txt 2>&1
grep -E "TIME|CAUSAL|SPLIT" $OUT/chunked.txt
timeout 150 python3 bench/attention.py --group headline --d 128 --l 4096,16384 --op fwd,fwdbwd --backend chunked,torch-efficient --budget 0.15 --no-progress --no-plots --out $OUT/chunked_bf16.json > $OUT/bench_bf16.txt 2>&1
timeout 60 python3 bench/attention.py --full --dtype float32 --d 128 --l 4096,16384 --op fwd --backend chunked,torch-efficient --budget 0.15 --no-progress --no-plots --out $OUT/chunked_f32.json > $OUT/bench_f32.txt 2>&1
tail -25 $OUT/bench_bf16.txt; tail -10 $OUT/bench_f32.txt
