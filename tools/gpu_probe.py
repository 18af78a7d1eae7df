"""Device smoke check of the environment: versions, arch, bf16 round trip, a RawModule compile
through the project's loader."""
import sys, numpy as np
import cupy, ml_dtypes
from cupyattn import _kernels
print("python", sys.version.split()[0], "cupy", cupy.__version__, "numpy", np.__version__, "ml_dtypes", ml_dtypes.__version__)
dev = cupy.cuda.Device()
print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cc", dev.compute_capability,
      "driver", cupy.cuda.runtime.driverGetVersion(), "runtime", cupy.cuda.runtime.runtimeGetVersion())
print("include dirs", _kernels._include_dirs(), "cuda path", cupy.cuda.get_cuda_path())
src = '#include <cuda_bf16.h>\ntemplate <typename T> __global__ void twice(T* x, long long n){ long long i = blockIdx.x*(long long)blockDim.x+threadIdx.x; if(i<n) x[i] = T(2.0f*float(x[i])); }\n'
import pathlib
p = _kernels.kernel_dir() / "zz_probe.cu"
p.write_text(src)
try:
    fn = _kernels.get_function(_kernels.KernelSpec("zz_probe.cu", "twice<__nv_bfloat16>"))
    x = cupy.asarray(np.arange(10).astype(ml_dtypes.bfloat16))
    fn((1,), (32,), (x, np.int64(10)))
    print("bf16 kernel:", x.astype(np.float32).get())
finally:
    p.unlink()
