// Storage types, fp16/bf16 <-> fp32 conversion and 16-byte vector access, for device and host code alike.
// No CUDA header is needed on the host: the host harness (g++) runs the same arithmetic on CPU buffers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define CAMTL_HD __host__ __device__ __forceinline__
#else
#define CAMTL_HD inline
#endif
// `CAMTL_UNROLL` for device code only (the host compiler warns on it).
#if defined(__CUDA_ARCH__)
#define CAMTL_UNROLL _Pragma("unroll")
#else
#define CAMTL_UNROLL
#endif

namespace camtl {

// 16-bit storage types: only their bits; every computation runs in fp32.
struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

// The dtype codes the bindings and the Python side use.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

CAMTL_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

CAMTL_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// IEEE binary16, round to nearest even (the device uses the hardware conversion).
CAMTL_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return static_cast<uint16_t>(sign | (absx > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (absx < 0x38800000u) {                                             // below 2^-14: a subnormal half
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);         // below 2^-25: rounds to 0
    const uint32_t exponent = absx >> 23;
    const uint32_t mantissa = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // units of 2^-24
    uint32_t r = mantissa >> shift;
    const uint32_t rem = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (absx >> 13) - (112u << 10);  // rebias the exponent from 127 to 15
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is still right
  return static_cast<uint16_t>(sign | r);
#endif
}

CAMTL_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24, exact
    return bits_float(sign | float_bits(magnitude));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

// bfloat16 is the top half of an fp32: round to nearest even on the dropped 16 bits.
CAMTL_HD uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

CAMTL_HD float bfloat16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

CAMTL_HD float to_float(float v) { return v; }
CAMTL_HD float to_float(half_t v) { return half_bits_to_float(v.bits); }
CAMTL_HD float to_float(bfloat16_t v) { return bfloat16_bits_to_float(v.bits); }

template <typename T> CAMTL_HD T from_float(float v);
template <> CAMTL_HD float from_float<float>(float v) { return v; }
template <> CAMTL_HD half_t from_float<half_t>(float v) { return half_t{float_to_half_bits(v)}; }
template <> CAMTL_HD bfloat16_t from_float<bfloat16_t>(float v) { return bfloat16_t{float_to_bfloat16_bits(v)}; }

// N consecutive elements moved as one unit: a 16-byte load/store when N * sizeof(T) == 16.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int N> CAMTL_HD void load_floats(const T* src, float (&dst)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(src);
CAMTL_UNROLL
  for (int e = 0; e < N; ++e) dst[e] = to_float(pack.v[e]);
}

template <typename T, int N> CAMTL_HD void store_floats(T* dst, const float (&src)[N]) {
  Pack<T, N> pack;
CAMTL_UNROLL
  for (int e = 0; e < N; ++e) pack.v[e] = from_float<T>(src[e]);
  *reinterpret_cast<Pack<T, N>*>(dst) = pack;
}

// Elements in one 16-byte vector.
template <typename T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

CAMTL_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- dispatch over (dtype, VEC, one flag): Launcher::run<T, VEC, FLAG>(), shared by every kernel file ----------

template <typename T, int VEC, class Launcher> int dispatch_flag(bool flag, Launcher& launcher) {
  return flag ? launcher.template run<T, VEC, true>() : launcher.template run<T, VEC, false>();
}

template <typename T, class Launcher> int dispatch_vec(bool vec16, bool flag, Launcher& launcher) {
  return vec16 ? dispatch_flag<T, kVec16<T>>(flag, launcher) : dispatch_flag<T, 1>(flag, launcher);
}

// VEC is kVec16<T> (16-byte vectors) when vec16, else 1; a dtype other than the three returns bad_dtype.
template <class Launcher> int dispatch(int dtype, bool vec16, bool flag, Launcher& launcher, int bad_dtype) {
  switch (dtype) {
    case kFloat32: return dispatch_vec<float>(vec16, flag, launcher);
    case kFloat16: return dispatch_vec<half_t>(vec16, flag, launcher);
    case kBFloat16: return dispatch_vec<bfloat16_t>(vec16, flag, launcher);
    default: return bad_dtype;
  }
}

}  // namespace camtl
