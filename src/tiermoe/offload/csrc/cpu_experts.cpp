// A layer's CPU share of bf16 SwiGLU experts in one call (offload/cpu_kernels.py builds it on first use).
//
// torch runs each expert as three GEMVs and two elementwise ops, each its own parallel region over 1-8
// tokens: measured at 20-39 GB/s of weights on 16 cores where the memory reads 99 (bench/NOTES.md 22, 33).
// Here every expert's gate and up rows are one parallel loop, the GLU a second, and every expert's down
// rows a third in which each thread owns a range of output rows (so the sum over experts needs no lock),
// each bf16 row widened to float in registers and read once for all of the expert's tokens.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float widen(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// A bf16 row against a float vector: widened 16 (AVX-512) or 8 (AVX2) at a time by a shift into the high
// half of each float lane, two accumulators to hide the FMA latency; the tail one by one.
inline float dot(const uint16_t* w, const float* x, int64_t n) {
    int64_t k = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k))), 16));
        __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k + 16))), 16));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= n; k += 16) {
        __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k))), 16));
        __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k + 8))), 16));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
    }
    __m256 s = _mm256_add_ps(a0, a1);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    acc = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#endif
    for (; k < n; k++) acc += widen(w[k]) * x[k];
    return acc;
}

// Four rows against one vector: four streams of weights in flight per thread, each x load used four times.
inline void dot4(const uint16_t* w, int64_t stride, const float* x, int64_t n, float* out) {
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = 0; k < n; k += 16) {
            const __m512 xk = _mm512_loadu_ps(x + k);
            for (int j = 0; j < 4; j++) {
                const __m256i b = _mm256_loadu_si256((const __m256i*)(w + j * stride + k));
                a[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)), xk, a[j]);
            }
        }
        for (int j = 0; j < 4; j++) out[j] = _mm512_reduce_add_ps(a[j]);
        return;
    }
#endif
    for (int j = 0; j < 4; j++) out[j] = dot(w + j * stride, x, n);
}

const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// x: float32 [T, H]. gate_up: per expert bf16 [2I, H] (gate rows, then up rows); down: bf16 [H, I].
// offsets: int64 [E + 1], expert e's pairs are offsets[e] .. offsets[e + 1] of tokens (int64 [P]) and
// weights (float32 [P]). Returns float32 [T, H]: sum over pairs of weight * down(silu(gate) * up).
torch::Tensor swiglu_bf16(torch::Tensor x, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
                          torch::Tensor offsets, torch::Tensor tokens, torch::Tensor weights) {
    const int64_t experts = static_cast<int64_t>(gate_up.size());
    const int64_t hidden = x.size(1), inter = down.empty() ? 0 : down[0].size(1), pairs = tokens.size(0);
    for (int64_t e = 0; e < experts; e++) {
        TORCH_CHECK(gate_up[e].is_contiguous() && down[e].is_contiguous(), "expert weights must be contiguous");
        TORCH_CHECK(gate_up[e].size(0) == 2 * inter && gate_up[e].size(1) == hidden && down[e].size(0) == hidden,
                    "expert shapes differ");
    }
    auto xs = x.index_select(0, tokens).contiguous();  // [P, H]: each pair's hidden state
    auto h = torch::empty({pairs, 2 * inter}, x.options());  // [P, 2I]
    auto act = torch::empty({pairs, inter}, x.options());  // [P, I]
    auto out = torch::zeros_like(x);
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const float* w = weights.data_ptr<float>();
    const float* xp = xs.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    float* ap = act.data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::vector<const uint16_t*> gu(experts), dn(experts);
    for (int64_t e = 0; e < experts; e++) gu[e] = bits(gate_up[e]), dn[e] = bits(down[e]);

    // gate and up: rows r .. r + 3 of expert e against each of its pairs' hidden states (2I is even; a
    // group of four that would straddle two experts is cut at the first one's end)
    const int64_t groups = (2 * inter + 3) / 4;
    at::parallel_for(0, experts * groups, 4, [&](int64_t begin, int64_t end) {
        float four[4];
        for (int64_t i = begin; i < end; i++) {
            const int64_t e = i / groups, r = (i % groups) * 4, rows = std::min<int64_t>(4, 2 * inter - r);
            const uint16_t* row = gu[e] + r * hidden;
            for (int64_t p = off[e]; p < off[e + 1]; p++) {
                if (rows == 4) {
                    dot4(row, hidden, xp + p * hidden, hidden, four);
                } else {
                    for (int64_t j = 0; j < rows; j++) four[j] = dot(row + j * hidden, xp + p * hidden, hidden);
                }
                for (int64_t j = 0; j < rows; j++) hp[p * 2 * inter + r + j] = four[j];
            }
        }
    });
    at::parallel_for(0, pairs * inter, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const int64_t p = i / inter, j = i % inter;
            const float g = hp[p * 2 * inter + j], u = hp[p * 2 * inter + inter + j];
            ap[i] = g / (1.f + std::exp(-g)) * u;
        }
    });
    // down: each thread owns output rows, summing every expert's pairs into them
    at::parallel_for(0, (hidden + 3) / 4, 4, [&](int64_t begin, int64_t end) {
        float four[4];
        for (int64_t g = begin; g < end; g++) {
            const int64_t r = g * 4, rows = std::min<int64_t>(4, hidden - r);
            for (int64_t e = 0; e < experts; e++) {
                const uint16_t* row = dn[e] + r * inter;
                for (int64_t p = off[e]; p < off[e + 1]; p++) {
                    if (rows == 4) {
                        dot4(row, inter, ap + p * inter, inter, four);
                    } else {
                        for (int64_t j = 0; j < rows; j++) four[j] = dot(row + j * inter, ap + p * inter, inter);
                    }
                    for (int64_t j = 0; j < rows; j++) op[tok[p] * hidden + r + j] += w[p] * four[j];
                }
            }
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("swiglu_bf16", &swiglu_bf16, "a layer's CPU share of bf16 SwiGLU experts"); }
