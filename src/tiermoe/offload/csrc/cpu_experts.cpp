// A layer's CPU share of SwiGLU experts in one call, bf16 or 4-bit (offload/cpu_kernels.py builds it on first use).
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
#include <limits>
#include <stdexcept>
#include <string>
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

// Part i of an expert's bytes (uint8 [nbytes], the host cache's entry) as T*. parts holds each part's byte
// offset and size as the format lays it out (Python); `bytes` is the size this kernel computes from the
// shapes: the two must agree (a layout that drifted from the format's fails here, not in a wrong sum), and
// the part must lie inside the expert, aligned for T. Python hands over each expert whole, not a view per
// part: the views cost 20 us an expert (six parts of a 4-bit one), more than the kernel for a small share.
template <typename T>
const T* part(const torch::Tensor& expert, const std::vector<int64_t>& parts, size_t i, int64_t bytes) {
    TORCH_CHECK(expert.dtype() == torch::kUInt8 && expert.dim() == 1 && expert.is_contiguous(),
                "an expert is its contiguous uint8 bytes");
    TORCH_CHECK(parts.size() >= 2 * i + 2, "a part's offset and size for every part");
    const int64_t offset = parts[2 * i], size = parts[2 * i + 1];
    // Not TORCH_CHECK: its message with values goes to libtorch as a std::string, and that call crashed
    // the GPU machine's torch 2.11 (a segfault at exactly this check, twice; literal messages raise
    // fine there). An exception of our own carries the same text to Python as a RuntimeError.
    if (size != bytes)
        throw std::runtime_error("part " + std::to_string(i) + " is " + std::to_string(size) +
                                 " bytes in the format, " + std::to_string(bytes) + " by the shapes");
    TORCH_CHECK(offset >= 0 && offset + bytes <= expert.numel(), "a part beyond its expert's bytes");
    const uint8_t* at = expert.data_ptr<uint8_t>() + offset;
    TORCH_CHECK(reinterpret_cast<uintptr_t>(at) % alignof(T) == 0, "a part not aligned for its type");
    return reinterpret_cast<const T*>(at);
}

}  // namespace

// The routing both kernels take: x float32 [T, H]; offsets int64 [E + 1] from 0 to P, rising; tokens int64
// [P] in [0, T); weights float32 [P].
void check_routing(const torch::Tensor& x, const torch::Tensor& offsets, const torch::Tensor& tokens,
                   const torch::Tensor& weights, int64_t experts) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [T, H]");
    TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == experts + 1, "offsets: int64 [E + 1]");
    TORCH_CHECK(tokens.dtype() == torch::kInt64 && weights.dtype() == torch::kFloat32 &&
                    weights.numel() == tokens.numel(), "tokens int64 and weights float32, one each a pair");
    const int64_t* off = offsets.data_ptr<int64_t>();
    TORCH_CHECK(off[0] == 0 && off[experts] == tokens.numel(), "offsets must run from 0 to the pairs");
    for (int64_t e = 0; e < experts; e++) TORCH_CHECK(off[e] <= off[e + 1], "offsets must rise");
    if (tokens.numel())
        TORCH_CHECK(tokens.min().item<int64_t>() >= 0 && tokens.max().item<int64_t>() < x.size(0), "tokens out of range");
}

// What both kernels share: each pair's hidden state, the gate and up outputs, the GLU between the two
// projections, the output; the pointers the parallel loops read and write.
struct Share {
    torch::Tensor xs, h, act, out;
    const int64_t* off;
    const int64_t* tok;
    const float* w;
    const float* xp;
    float* hp;
    float* ap;
    float* op;
    int64_t pairs, inter;

    Share(const torch::Tensor& x, const torch::Tensor& offsets, const torch::Tensor& tokens,
          const torch::Tensor& weights, int64_t inter_)
        : xs(x.index_select(0, tokens).contiguous()),  // [P, H]: each pair's hidden state
          h(torch::empty({tokens.size(0), 2 * inter_}, x.options())),  // [P, 2I]: gate, then up
          act(torch::empty({tokens.size(0), inter_}, x.options())),  // [P, I]
          out(torch::zeros_like(x)),
          off(offsets.data_ptr<int64_t>()),
          tok(tokens.data_ptr<int64_t>()),
          w(weights.data_ptr<float>()),
          xp(xs.data_ptr<float>()),
          hp(h.data_ptr<float>()),
          ap(act.data_ptr<float>()),
          op(out.data_ptr<float>()),
          pairs(tokens.size(0)),
          inter(inter_) {}

    // act = silu(gate) * up, every pair
    void glu() {
        at::parallel_for(0, pairs * inter, 4096, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; i++) {
                const int64_t p = i / inter, j = i % inter;
                const float g = hp[p * 2 * inter + j], u = hp[p * 2 * inter + inter + j];
                ap[i] = g / (1.f + std::exp(-g)) * u;
            }
        });
    }
};

// x: float32 [T, H]. bank: each expert's bytes (uint8) holding its bf16 gate_up [2I, H] (gate rows, then up
// rows) and down [H, I], at parts' byte offsets (with their sizes: offset, bytes, offset, bytes). offsets:
// int64 [E + 1], expert e's pairs are offsets[e] .. offsets[e + 1] of tokens (int64 [P]) and
// weights (float32 [P]). Returns float32 [T, H]: sum over pairs of weight * down(silu(gate) * up).
torch::Tensor swiglu_bf16(torch::Tensor x, std::vector<torch::Tensor> bank, std::vector<int64_t> parts,
                          int64_t hidden, int64_t inter, torch::Tensor offsets, torch::Tensor tokens,
                          torch::Tensor weights) {
    const int64_t experts = static_cast<int64_t>(bank.size());
    check_routing(x, offsets, tokens, weights, experts);
    TORCH_CHECK(x.size(1) == hidden && inter > 0, "x's hidden size must be the experts'");
    std::vector<const uint16_t*> gu(experts), dn(experts);
    for (int64_t e = 0; e < experts; e++) {  // every part checked before anything is allocated
        gu[e] = part<uint16_t>(bank[e], parts, 0, 2 * inter * hidden * 2);
        dn[e] = part<uint16_t>(bank[e], parts, 1, hidden * inter * 2);
    }
    Share s(x, offsets, tokens, weights, inter);

    // gate and up: rows r .. r + 3 of expert e against each of its pairs' hidden states (2I is even; a
    // group of four that would straddle two experts is cut at the first one's end)
    const int64_t groups = (2 * inter + 3) / 4;
    at::parallel_for(0, experts * groups, 4, [&](int64_t begin, int64_t end) {
        float four[4];
        for (int64_t i = begin; i < end; i++) {
            const int64_t e = i / groups, r = (i % groups) * 4, rows = std::min<int64_t>(4, 2 * inter - r);
            const uint16_t* row = gu[e] + r * hidden;
            for (int64_t p = s.off[e]; p < s.off[e + 1]; p++) {
                if (rows == 4) {
                    dot4(row, hidden, s.xp + p * hidden, hidden, four);
                } else {
                    for (int64_t j = 0; j < rows; j++) four[j] = dot(row + j * hidden, s.xp + p * hidden, hidden);
                }
                for (int64_t j = 0; j < rows; j++) s.hp[p * 2 * inter + r + j] = four[j];
            }
        }
    });
    s.glu();
    // down: each thread owns output rows, summing every expert's pairs into them
    at::parallel_for(0, (hidden + 3) / 4, 4, [&](int64_t begin, int64_t end) {
        float four[4];
        for (int64_t g = begin; g < end; g++) {
            const int64_t r = g * 4, rows = std::min<int64_t>(4, hidden - r);
            for (int64_t e = 0; e < experts; e++) {
                const uint16_t* row = dn[e] + r * inter;
                for (int64_t p = s.off[e]; p < s.off[e + 1]; p++) {
                    if (rows == 4) {
                        dot4(row, inter, s.ap + p * inter, inter, four);
                    } else {
                        for (int64_t j = 0; j < rows; j++) four[j] = dot(row + j * inter, s.ap + p * inter, inter);
                    }
                    for (int64_t j = 0; j < rows; j++) s.op[s.tok[p] * hidden + r + j] += s.w[p] * four[j];
                }
            }
        }
    });
    return s.out;
}

namespace {

constexpr int64_t LANES = 16;  // outputs of one block: one cache line of a qweight row
// qweight rows read ahead (each a line N x 4 bytes past the last, where the hardware's prefetchers do
// not follow): 1.3x one thread's speed and 1.5x two threads' on the CPU machine; 16 since the zero points
// are unpacked in registers (8 beat 4, 16, 32, 64 before; now 16 is 1.15x 8 on one thread from DRAM, level
// on two, bench/NOTES.md 44)
constexpr int64_t PREFETCH_ROWS = 16;

constexpr int64_t SPAN = 4;  // lane blocks a task computes together where they divide the outputs

// Where the build has AVX-512 (BW) or AVX2, the 4-bit kernels take their inputs in int8: a qweight row's
// nibbles meet the inputs' int8 codes four products a 32-bit lane an instruction (vpdpbusd with VNNI, else
// vpmaddubsw and vpmaddwd, as llama.cpp's Q4 x Q8 dot products), where widening every nibble to float took
// 32 instructions a row of 16 words. The quantization (one scale per 8 inputs, a residual term for outlier
// rows, both projections) moves results by up to about 1.4 % of their largest (tests/test_offload_cpu_compute.py
// states the bound).
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TIERMOE_INT8_512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TIERMOE_INT8_256 1
#endif

// One input vector x [K] of a 4-bit matrix as its kernel reads it: the floats (plain builds); or x
// quantized per qweight row (inputs 8 i .. 8 i + 7: the row's scale max |x| / 127, its even and its odd
// inputs' int8 codes packed four to an int32, as the row's nibbles pair up in a byte), a second such term
// for the rounding residual of a row far above the vector's typical row (scale2 0 elsewhere), and the
// sum of each row's quantized inputs (for the zero points).
struct Input {
    const float* x;
    const int32_t* even;
    const int32_t* odd;
    const float* scale;
    const int32_t* even2;
    const int32_t* odd2;
    const float* scale2;
    const float* sum;
    const int64_t* fine;  // the rows with a residual term, rising
    int64_t fines;
};

// A row whose largest input is this many times the vector's median row's gets the residual term: an
// outlier channel leaves its 7 neighbours few of the int8 levels, which matters where the model has
// shrunk the outlier's weights to match (a review measured 2.3-7.9 % of the largest output off at
// 20-100x outliers without it, 0.9-1.0 % with it; about 3 % of rows flagged, Gaussian inputs untouched).
constexpr float FINE_ROW = 4.f;

// 8 floats as int8 codes with the scale max |v| / 127: codes (q), packed even and odd, their sum; returns the
// scale. A non-finite input gives codes 0 and a NaN scale, so the output is NaN, as the float path's is.
inline float quantize8(const float* v, int32_t* q, int32_t& even, int32_t& odd, int32_t& total) {
    float most = 0.f;
    bool finite = true;
    for (int j = 0; j < 8; j++) finite &= std::isfinite(v[j]), most = std::max(most, std::fabs(v[j]));
    uint32_t packed[2] = {0, 0};
    total = 0;
    const float inv = finite && most > 1e-30f ? 127.f / most : 0.f;
    for (int j = 0; j < 8; j++) {
        q[j] = static_cast<int32_t>(std::nearbyint(v[j] * inv));
        packed[j % 2] |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(q[j]))) << (8 * (j / 2));
        total += q[j];
    }
    even = static_cast<int32_t>(packed[0]), odd = static_cast<int32_t>(packed[1]);
    return finite ? most / 127.f : std::numeric_limits<float>::quiet_NaN();
}

// Vectors of K floats (K a multiple of 8) as the kernels take them; the quantized ones kept here (rows
// points into them: not copied).
struct Inputs {
    std::vector<int32_t> even, odd, even2, odd2;
    std::vector<float> scale, scale2, sum;
    std::vector<int64_t> fine, fine_at;
    std::vector<Input> rows;

    Inputs(const Inputs&) = delete;
    Inputs& operator=(const Inputs&) = delete;

    Inputs(const float* x, int64_t count, int64_t K) : rows(count) {
#if defined(TIERMOE_INT8_512) || defined(TIERMOE_INT8_256)
        const int64_t per = K / 8, n = count * per;
        even.resize(n), odd.resize(n), even2.resize(n), odd2.resize(n), scale.resize(n), scale2.resize(n), sum.resize(n);
        std::vector<float> most(n), typical(count);
        for (int64_t r = 0; r < n; r++) {
            float m = 0.f;
            for (int j = 0; j < 8; j++) m = std::max(m, std::fabs(x[r * 8 + j]));
            most[r] = m;
        }
        for (int64_t p = 0; p < count; p++) {  // each vector's median row
            std::vector<float> rows_most(most.begin() + p * per, most.begin() + (p + 1) * per);
            std::nth_element(rows_most.begin(), rows_most.begin() + per / 2, rows_most.end());
            typical[p] = rows_most[per / 2];
        }
        at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; r++) {
                const float* v = x + r * 8;  // row r % per of vector r / per
                int32_t q[8], total, total2 = 0;
                scale[r] = quantize8(v, q, even[r], odd[r], total);
                scale2[r] = 0.f, even2[r] = odd2[r] = 0;
                if (most[r] > FINE_ROW * typical[r / per] && std::isfinite(scale[r])) {
                    float residual[8];
                    for (int j = 0; j < 8; j++) residual[j] = v[j] - scale[r] * static_cast<float>(q[j]);
                    scale2[r] = quantize8(residual, q, even2[r], odd2[r], total2);
                }
                // The sum of the quantized inputs, not of x: the zero points then meet the same x the codes
                // do, and (code - zero) x is what is rounded, not code x (1.6x larger where zeros sit mid-range).
                sum[r] = total * scale[r] + total2 * scale2[r];
            }
        });
        // Each vector's rows with a residual term, listed: the kernels visit them in a loop of their own
        // after each group's rows (a branch in the row loop, taken at random, cost 30 % of a hot call).
        fine_at.assign(count + 1, 0);
        for (int64_t p = 0; p < count; p++) {
            for (int64_t i = 0; i < per; i++)
                if (scale2[p * per + i] != 0.f) fine.push_back(i);
            fine_at[p + 1] = static_cast<int64_t>(fine.size());
        }
        for (int64_t p = 0; p < count; p++) {
            const int64_t at = p * per;
            rows[p] = {x + p * K, &even[at], &odd[at], &scale[at], &even2[at], &odd2[at], &scale2[at], &sum[at],
                       fine.data() + fine_at[p], fine_at[p + 1] - fine_at[p]};
        }
#else
        for (int64_t p = 0; p < count; p++) rows[p] = {x + p * K, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0};
#endif
    }
};

// Per 32-bit lane of a qweight row's words, sum over its 8 codes of code x int8 input: the even nibbles
// (masked in place) against the even inputs, the odd ones (shifted down) against the odd. Each 16-bit
// pair sum of vpmaddubsw is at most 2 x 15 x 127, far from saturating.
#if defined(TIERMOE_INT8_512)
inline __m512i nibble_dot(__m512i words, __m512i even, __m512i odd) {
    const __m512i low = _mm512_set1_epi32(0x0F0F0F0F);
    const __m512i lo = _mm512_and_si512(words, low), hi = _mm512_and_si512(_mm512_srli_epi32(words, 4), low);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, even), hi, odd);
#else
    const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, even), _mm512_maddubs_epi16(hi, odd));
    return _mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#endif
}

// One qweight row's B blocks (row: its first block's words) against one int8 term of its inputs (codes
// packed even and odd, the term's scale), into acc: a row's main term and an outlier row's residual.
template <int64_t B>
inline void add_row(const int32_t* row, int32_t even, int32_t odd, float scale, __m512* acc) {
    const __m512i e = _mm512_set1_epi32(even), o = _mm512_set1_epi32(odd);
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < B; b++)
        acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibble_dot(_mm512_loadu_si512(row + b * LANES), e, o)), s, acc[b]);
}

// zero[g, n] of outputs n0 .. n0 + LANES as floats: the two qzeros words (8 outputs each, output n in
// bits 4 (n % 8)) broadcast to their halves and shifted per lane (16 scalar extractions cost 25-39 % of the
// speed where many tokens share an expert, measured by a review).
inline __m512 zeros_of(const int32_t* qz, int64_t N, int64_t g, int64_t n0) {
    const int32_t* z = qz + g * (N / 8) + n0 / 8;
    const __m512i words = _mm512_mask_set1_epi32(_mm512_set1_epi32(z[0]), 0xFF00, z[1]);
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(15)));
}
#elif defined(TIERMOE_INT8_256)
inline __m256i nibble_dot(__m256i words, __m256i even, __m256i odd) {
    const __m256i low = _mm256_set1_epi32(0x0F0F0F0F);
    const __m256i lo = _mm256_and_si256(words, low), hi = _mm256_and_si256(_mm256_srli_epi32(words, 4), low);
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, even), hi, odd);
#else
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// As the AVX-512 add_row, in two halves of 8 lanes a block.
template <int64_t B>
inline void add_row(const int32_t* row, int32_t even, int32_t odd, float scale, __m256 (*acc)[2]) {
    const __m256i e = _mm256_set1_epi32(even), o = _mm256_set1_epi32(odd);
    const __m256 s = _mm256_set1_ps(scale);
    for (int64_t b = 0; b < B; b++)
        for (int h = 0; h < 2; h++) {
            const __m256i dot = nibble_dot(_mm256_loadu_si256((const __m256i*)(row + b * LANES + 8 * h)), e, o);
            acc[b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[b][h]);
        }
}

// As the AVX-512 zeros_of, half h (outputs n0 + 8 h .. n0 + 8 h + 8): one qzeros word.
inline __m256 zeros_of(const int32_t* qz, int64_t N, int64_t g, int64_t n0, int h) {
    const __m256i word = _mm256_set1_epi32(qz[g * (N / 8) + n0 / 8 + h]);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(15)));
}
#else
// zero[g, n] of outputs n0 .. n0 + LANES (qzeros int32 [K / G, N / 8], output n in bits 4 (n % 8)), as floats
inline void zeros_of(const int32_t* qz, int64_t N, int64_t g, int64_t n0, float* zeros) {
    for (int64_t l = 0; l < LANES; l++) {
        const int64_t n = n0 + l;
        zeros[l] = static_cast<float>((qz[g * (N / 8) + n / 8] >> (4 * (n % 8))) & 15);
    }
}
#endif

// Outputs n0 .. n0 + B x LANES of one 4-bit matrix in the GPTQ layout (qweight int32 [K / 8, N], input
// 8 i + j in bits 4 j of row i; qzeros int32 [K / G, N / 8]; scales fp16 [K / G, N];
// w[n, k] = scales[g, n] * (q[k, n] - zero[g, n])) against x [K]: per group, the sum of x times the
// codes less the zero times the sum of x, scaled. B blocks of LANES outputs side by side: each qweight
// row's B adjacent lines read together (B = SPAN: 1.4x one thread's speed, 1.5x two threads' on the CPU
// machine, bench/NOTES.md section 39); each block's sums in the same order whatever B, so the same bits.
template <int64_t B>
void int4_blocks(const int32_t* qw, const int32_t* qz, const at::Half* sc, int64_t K, int64_t N, int64_t G,
                 int64_t n0, const Input& in, float* y) {
#if defined(TIERMOE_INT8_512)
    // A qweight row's 16 words a block in a register, against the row's int8 inputs, scaled in float.
    __m512 total[B];
    for (int64_t b = 0; b < B; b++) total[b] = _mm512_setzero_ps();
    int64_t f = 0;  // the next outlier row
    for (int64_t g = 0; g < K / G; g++) {
        __m512 acc[B];
        for (int64_t b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
        float xs = 0.f;
        for (int64_t i = g * G / 8; i < (g + 1) * G / 8; i++) {
            const int32_t* ahead = qw + std::min(i + PREFETCH_ROWS, K / 8 - 1) * N + n0;  // the last row at the end
            for (int64_t b = 0; b < B; b++) _mm_prefetch(reinterpret_cast<const char*>(ahead + b * LANES), _MM_HINT_T0);
            xs += in.sum[i];
            add_row<B>(qw + i * N + n0, in.even[i], in.odd[i], in.scale[i], acc);
        }
        for (; f < in.fines && in.fine[f] < (g + 1) * G / 8; f++) {  // the group's outlier rows' residual terms
            const int64_t i = in.fine[f];
            add_row<B>(qw + i * N + n0, in.even2[i], in.odd2[i], in.scale2[i], acc);
        }
        for (int64_t b = 0; b < B; b++) {
            const __m512 scale =
                _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * N + n0 + b * LANES)));
            const __m512 codes = _mm512_fnmadd_ps(zeros_of(qz, N, g, n0 + b * LANES), _mm512_set1_ps(xs), acc[b]);
            total[b] = _mm512_fmadd_ps(scale, codes, total[b]);
        }
    }
    for (int64_t b = 0; b < B; b++) _mm512_storeu_ps(y + b * LANES, total[b]);
#elif defined(TIERMOE_INT8_256)
    // The same in two halves of 8 lanes a block (AVX2: most desktop CPUs).
    __m256 total[B][2];
    for (int64_t b = 0; b < B; b++) total[b][0] = total[b][1] = _mm256_setzero_ps();
    int64_t f = 0;  // the next outlier row
    for (int64_t g = 0; g < K / G; g++) {
        __m256 acc[B][2];
        for (int64_t b = 0; b < B; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
        float xs = 0.f;
        for (int64_t i = g * G / 8; i < (g + 1) * G / 8; i++) {
            const int32_t* ahead = qw + std::min(i + PREFETCH_ROWS, K / 8 - 1) * N + n0;  // the last row at the end
            for (int64_t b = 0; b < B; b++) _mm_prefetch(reinterpret_cast<const char*>(ahead + b * LANES), _MM_HINT_T0);
            xs += in.sum[i];
            add_row<B>(qw + i * N + n0, in.even[i], in.odd[i], in.scale[i], acc);
        }
        for (; f < in.fines && in.fine[f] < (g + 1) * G / 8; f++) {  // the group's outlier rows' residual terms
            const int64_t i = in.fine[f];
            add_row<B>(qw + i * N + n0, in.even2[i], in.odd2[i], in.scale2[i], acc);
        }
        for (int64_t b = 0; b < B; b++) {
            for (int h = 0; h < 2; h++) {
                const __m256 scale = _mm256_cvtph_ps(
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * N + n0 + b * LANES + 8 * h)));
                const __m256 zeros = zeros_of(qz, N, g, n0 + b * LANES, h);
                const __m256 codes = _mm256_fnmadd_ps(zeros, _mm256_set1_ps(xs), acc[b][h]);
                total[b][h] = _mm256_fmadd_ps(scale, codes, total[b][h]);
            }
        }
    }
    for (int64_t b = 0; b < B; b++) {
        _mm256_storeu_ps(y + b * LANES, total[b][0]);
        _mm256_storeu_ps(y + b * LANES + 8, total[b][1]);
    }
#else
    const float* x = in.x;
    // Plain loops, which the compiler vectorises, a block at a time.
    for (int64_t b = 0; b < B; b++) {
        const int64_t m0 = n0 + b * LANES;
        float out[LANES] = {};
        for (int64_t g = 0; g < K / G; g++) {
            float acc[LANES] = {};
            float xs = 0.f;
            for (int64_t i = g * G / 8; i < (g + 1) * G / 8; i++) {
                __builtin_prefetch(qw + std::min(i + PREFETCH_ROWS, K / 8 - 1) * N + m0);  // the last row at the end
                const int32_t* row = qw + i * N + m0;
                for (int j = 0; j < 8; j++) {
                    const float xv = x[i * 8 + j];
                    xs += xv;
                    for (int64_t l = 0; l < LANES; l++) acc[l] += xv * static_cast<float>((row[l] >> (4 * j)) & 15);
                }
            }
            float zeros[LANES];
            zeros_of(qz, N, g, m0, zeros);
            for (int64_t l = 0; l < LANES; l++)
                out[l] += static_cast<float>(sc[g * N + m0 + l]) * (acc[l] - zeros[l] * xs);
        }
        for (int64_t l = 0; l < LANES; l++) y[b * LANES + l] = out[l];
    }
#endif
}

struct Int4Matrix {
    const int32_t* qw;
    const int32_t* qz;
    const at::Half* sc;
};

}  // namespace

// As swiglu_bf16, for 4-bit experts in the GPTQ layout (formats/int4.py): each expert's bytes hold, at parts'
// byte offsets (with their sizes), gate_up's qweight int32 [2, H / 8, I], qzeros int32 [2, H / G, I / 8], scales fp16
// [2, H / G, I] (gate, then up) and down's [I / 8, H], [I / Gd, H / 8], [I / Gd, H]; group sizes G (gate and
// up) and Gd (down); I and H multiples of 16.
torch::Tensor swiglu_int4(torch::Tensor x, std::vector<torch::Tensor> bank, std::vector<int64_t> parts,
                          int64_t hidden, int64_t inter, int64_t group, int64_t down_group, torch::Tensor offsets,
                          torch::Tensor tokens, torch::Tensor weights) {
    const int64_t experts = static_cast<int64_t>(bank.size());
    check_routing(x, offsets, tokens, weights, experts);
    TORCH_CHECK(x.size(1) == hidden, "x's hidden size must be the experts'");
    TORCH_CHECK(inter > 0 && inter % LANES == 0 && hidden % LANES == 0, "int4 experts need sizes in multiples of 16");
    TORCH_CHECK(group > 0 && group % 8 == 0 && hidden % group == 0 && down_group > 0 && down_group % 8 == 0 &&
                    inter % down_group == 0,
                "int4 groups must be whole qweight rows (multiples of 8) dividing the inputs");
    TORCH_CHECK(parts.size() == 12, "six int4 parts (offset, bytes): gate_up's and down's qweight, qzeros, scales");
    const int64_t gu_qw = 2 * (hidden / 8) * inter, gu_qz = 2 * (hidden / group) * (inter / 8),
                  gu_sc = 2 * (hidden / group) * inter;  // elements of gate_up's parts (gate, then up)
    std::vector<Int4Matrix> gu(2 * experts), dn(experts);
    for (int64_t e = 0; e < experts; e++) {
        const int32_t* qw = part<int32_t>(bank[e], parts, 0, gu_qw * 4);
        const int32_t* qz = part<int32_t>(bank[e], parts, 1, gu_qz * 4);
        const at::Half* sc = part<at::Half>(bank[e], parts, 2, gu_sc * 2);
        for (int64_t m = 0; m < 2; m++) gu[2 * e + m] = {qw + m * gu_qw / 2, qz + m * gu_qz / 2, sc + m * gu_sc / 2};
        dn[e] = {part<int32_t>(bank[e], parts, 3, (inter / 8) * hidden * 4),
                 part<int32_t>(bank[e], parts, 4, (inter / down_group) * (hidden / 8) * 4),
                 part<at::Half>(bank[e], parts, 5, (inter / down_group) * hidden * 2)};
    }
    Share s(x, offsets, tokens, weights, inter);  // after every part's check
    // A task's outputs: SPAN blocks of LANES where they divide the matrix's outputs and leave every thread two
    // tasks or more (at::parallel_for hands each thread a run of whole tasks: fewer, larger tasks would idle
    // threads of a many-core machine, where one expert's gate and up make 24), else one block.
    using Lanes = void (*)(const int32_t*, const int32_t*, const at::Half*, int64_t, int64_t, int64_t, int64_t,
                           const Input&, float*);
    const int64_t threads = at::get_num_threads();
    const auto width = [threads](int64_t n, int64_t matrices) {
        const bool span = n / LANES % SPAN == 0 && matrices * (n / (SPAN * LANES)) >= 2 * threads;
        return span ? SPAN * LANES : LANES;
    };
    const auto lanes = [](int64_t w) -> Lanes { return w == LANES ? int4_blocks<1> : int4_blocks<SPAN>; };
    // gate and up: a task is `wide` outputs of one of an expert's two matrices, for each of its pairs
    const int64_t wide = width(inter, 2 * experts), tasks = inter / wide;
    const Lanes up_lanes = lanes(wide);
    const Inputs xs(s.xp, s.pairs, hidden);
    at::parallel_for(0, experts * 2 * tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const int64_t em = i / tasks, n0 = (i % tasks) * wide, e = em / 2, m = em % 2;
            for (int64_t p = s.off[e]; p < s.off[e + 1]; p++)
                up_lanes(gu[em].qw, gu[em].qz, gu[em].sc, hidden, inter, group, n0, xs.rows[p],
                         s.hp + p * 2 * inter + m * inter + n0);
        }
    });
    s.glu();
    const Inputs acts(s.ap, s.pairs, inter);
    // down: each thread owns `down_wide`-wide blocks of outputs, summing every expert's pairs into them
    const int64_t down_wide = width(hidden, 1);
    const Lanes down_lanes = lanes(down_wide);
    at::parallel_for(0, hidden / down_wide, 1, [&](int64_t begin, int64_t end) {
        float y[SPAN * LANES];
        for (int64_t b = begin; b < end; b++) {
            const int64_t n0 = b * down_wide;
            for (int64_t e = 0; e < experts; e++) {
                for (int64_t p = s.off[e]; p < s.off[e + 1]; p++) {
                    down_lanes(dn[e].qw, dn[e].qz, dn[e].sc, inter, hidden, down_group, n0, acts.rows[p], y);
                    for (int64_t l = 0; l < down_wide; l++) s.op[s.tok[p] * hidden + n0 + l] += s.w[p] * y[l];
                }
            }
        }
    });
    return s.out;
}

// The vector instructions this build uses: "avx512-vnni", "avx512", "avx2-vnni", "avx2" (4-bit experts
// against int8 inputs; VNNI: four products a lane an instruction) or "none" (plain loops).
std::string simd() {
#if defined(TIERMOE_INT8_512)
#if defined(__AVX512VNNI__)
    return "avx512-vnni";
#else
    return "avx512";
#endif
#elif defined(TIERMOE_INT8_256)
#if defined(__AVXVNNI__)
    return "avx2-vnni";
#else
    return "avx2";
#endif
#else
    return "none";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("simd", &simd, "the vector instructions of this build");
    // The GIL released while a share computes: the host cache's reader threads (disk) go on meanwhile.
    m.def("swiglu_bf16", &swiglu_bf16, "a layer's CPU share of bf16 SwiGLU experts",
          py::call_guard<py::gil_scoped_release>());
    m.def("swiglu_int4", &swiglu_int4, "a layer's CPU share of 4-bit (GPTQ layout) SwiGLU experts",
          py::call_guard<py::gil_scoped_release>());
}
