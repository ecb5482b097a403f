// CuTe oracle for pykernels/emu/hopper/layouts.py (host-only; no GPU, no nvcc).
//
// Prints, one record per line, CuTe's own view of the Hopper (SM90) GMMA
// layouts so that tests/emu/test_hopper_layouts.py can compare them with the
// pure-numpy implementation.  Only CuTe *traits/layout* code is used; nothing
// here executes a wgmma, so CUTE_ARCH_MMA_SM90A_ENABLED is not needed.
//
// Record formats (all integers decimal unless noted):
//   C   <dtype> <N> <t> m0 n0 m1 n1 ...   CLayout (thread t, value v) -> (m, n)
//   A   <bits> <t> m0 k0 m1 k1 ...        RS-variant ALayout (t, v) -> (m, k)
//   SWZ <B> x0 y0 x1 y1 ...               Swizzle<B,4,3> applied to byte address x
//   ENC <start> <lbo> <sbo> <base> <type> <hex desc>   GmmaDescriptor bitfield packing
//   ATOM <major> <swz> <ebytes> <MN> <K> off(0,0) off(0,1) ...   layout atom, row-major
//          over (mn, k), element -> byte offset from a 1024-aligned base
//   TILE <major> <swz> <ebytes> <order> <MN> <K> <hex desc> <start> <lbo> <sbo> <base> <type>
//          off(0,0) off(0,1) ...    one wgmma-sized piece of tile_to_shape(atom) +
//          make_gmma_desc of it (<start> is the piece's byte offset from the base,
//          which CuTe cannot compute on the host; the desc's start field is 0)
// Lines that do not start with one of these tags (e.g. CuTe's host-side
// "ERROR: cast_smem_ptr_to_uint not supported" notice) must be ignored.
#include <cstdio>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
// The *_ext traits header (N = 24, 40, ... not in the base set) does not
// include the matching arch header itself, so pull it in first.
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cute/atom/mma_traits_sm90_gmma_ext.hpp>

using namespace cute;

// 1024-byte alignment: the swizzle is a function of the absolute address, so
// the base must be aligned to the largest swizzle period (8 rows x 128 B).
alignas(1024) static uint8_t g_smem[1 << 17];

template <class Traits>
void print_clayout(const char* dtype, int N) {
  typename Traits::CLayout cl{};
  // CLayout maps (thread, value) -> linear index of the column-major 64 x N tile.
  for (int t = 0; t < 128; ++t) {
    printf("C %s %d %d", dtype, N, t);
    for (int v = 0; v < int(size<1>(cl)); ++v) {
      int idx = int(cl(t, v));
      printf(" %d %d", idx % 64, idx / 64);
    }
    printf("\n");
  }
}

template <class Traits>
void print_alayout(int bits) {
  typename Traits::ALayout al{};
  for (int t = 0; t < 128; ++t) {
    printf("A %d %d", bits, t);
    for (int v = 0; v < int(size<1>(al)); ++v) {
      int idx = int(al(t, v));
      printf(" %d %d", idx % 64, idx / 64);
    }
    printf("\n");
  }
}

template <int B>
void print_swizzle() {
  Swizzle<B, 4, 3> s{};
  printf("SWZ %d", B);
  for (int x = 0; x < 4096; ++x) printf(" %d %d", x, int(s(x)));
  printf("\n");
}

void print_enc(int start, int lbo, int sbo, int base, int type) {
  GmmaDescriptor d;
  d.bitfield.start_address_ = uint16_t(start);
  d.bitfield.leading_byte_offset_ = uint16_t(lbo);
  d.bitfield.stride_byte_offset_ = uint16_t(sbo);
  d.bitfield.base_offset_ = uint8_t(base);
  d.bitfield.layout_type_ = uint8_t(type);
  printf("ENC %d %d %d %d %d %llx\n", start, lbo, sbo, base, type,
         static_cast<unsigned long long>(d.desc_));
}

template <class T, class Layout_>
void print_offsets(Layout_ const& layout) {
  auto t = make_tensor(make_smem_ptr(reinterpret_cast<T*>(g_smem)), layout);
  for (int i = 0; i < int(size<0>(t)); ++i)
    for (int j = 0; j < int(size<1>(t)); ++j) {
      long off = reinterpret_cast<uint8_t const*>(&t(i, j)) - g_smem;
      printf(" %ld", off);
    }
  printf("\n");
}

template <class T, class Atom>
void print_atom(const char* major, const char* swz) {
  Atom atom{};
  printf("ATOM %s %s %d %d %d", major, swz, int(sizeof(T)), int(size<0>(atom)), int(size<1>(atom)));
  print_offsets<T>(atom);
}

template <GMMA::Major Mj, class T, class Atom, class TileShape, class Order, class SubShape>
void print_tile(const char* major, const char* swz, const char* order) {
  // Tile the atom over the whole smem block, then cut it into the 32-byte-K
  // pieces one wgmma consumes (K-major SW64/SW128 atoms are wider than one
  // instruction's K; real kernels advance the descriptor start inside the atom).
  auto layout = tile_to_shape(Atom{}, TileShape{}, Order{});
  auto full = make_tensor(make_smem_ptr(reinterpret_cast<T*>(g_smem)), layout);
  constexpr int NK = int(size<1>(TileShape{})) / int(size<1>(SubShape{}));
  for (int kb = 0; kb < NK; ++kb) {
    auto t = local_tile(full, SubShape{}, make_coord(0, kb));
    GmmaDescriptor d = SM90::GMMA::make_gmma_desc<Mj>(t);
    // On the host cast_smem_ptr_to_uint() returns 0, so print the start byte
    // offset ourselves: element (0,0) lies in swizzle row 0 and is unswizzled.
    long start = reinterpret_cast<uint8_t const*>(&t(0, 0)) - g_smem;
    printf("TILE %s %s %d %s %d %d %llx %ld %d %d %d %d", major, swz, int(sizeof(T)), order,
           int(size<0>(t)), int(size<1>(t)), static_cast<unsigned long long>(d.desc_), start,
           int(d.bitfield.leading_byte_offset_), int(d.bitfield.stride_byte_offset_),
           int(d.bitfield.base_offset_), int(d.bitfield.layout_type_));
    for (int i = 0; i < int(size<0>(t)); ++i)
      for (int j = 0; j < int(size<1>(t)); ++j)
        printf(" %ld", long(reinterpret_cast<uint8_t const*>(&t(i, j)) - g_smem));
    printf("\n");
  }
}

template <class T>
void print_all_atoms_and_tiles() {
  using namespace SM90::GMMA;
  constexpr int EB = int(sizeof(T));
  print_atom<T, Layout_K_INTER_Atom<T>>("K", "none");
  print_atom<T, Layout_K_SW32_Atom<T>>("K", "32B");
  print_atom<T, Layout_K_SW64_Atom<T>>("K", "64B");
  print_atom<T, Layout_K_SW128_Atom<T>>("K", "128B");
  print_atom<T, Layout_MN_INTER_Atom<T>>("MN", "none");
  print_atom<T, Layout_MN_SW32_Atom<T>>("MN", "32B");
  print_atom<T, Layout_MN_SW64_Atom<T>>("MN", "64B");
  print_atom<T, Layout_MN_SW128_Atom<T>>("MN", "128B");

  // K-major wgmma operand: 64 rows (A; B uses N rows the same way) x 32 bytes of K.
  using KSub = Shape<_64, Int<32 / EB>>;
#define KTILE(ATOM, SWZ, KBYTES)                                                     \
  print_tile<Major::K, T, ATOM<T>, Shape<_64, Int<KBYTES / EB>>, GenColMajor, KSub>("K", SWZ, "col"); \
  print_tile<Major::K, T, ATOM<T>, Shape<_64, Int<KBYTES / EB>>, GenRowMajor, KSub>("K", SWZ, "row");
  KTILE(Layout_K_INTER_Atom, "none", 32)
  KTILE(Layout_K_SW32_Atom, "32B", 32)
  KTILE(Layout_K_SW64_Atom, "64B", 64)
  KTILE(Layout_K_SW128_Atom, "128B", 128)
#undef KTILE
  // MN-major operand: two 128-byte MN spans x 32 bytes' worth of K elements
  // (256 / bits, what make_gmma_desc<MN> requires for dense MMA).
  using MNShape = Shape<Int<256 / EB>, Int<32 / EB>>;
#define MNTILE(ATOM, SWZ)                                                            \
  print_tile<Major::MN, T, ATOM<T>, MNShape, GenColMajor, MNShape>("MN", SWZ, "col"); \
  print_tile<Major::MN, T, ATOM<T>, MNShape, GenRowMajor, MNShape>("MN", SWZ, "row");
  MNTILE(Layout_MN_INTER_Atom, "none")
  MNTILE(Layout_MN_SW32_Atom, "32B")
  MNTILE(Layout_MN_SW64_Atom, "64B")
  MNTILE(Layout_MN_SW128_Atom, "128B")
#undef MNTILE
}

#define CL(N)                                                              \
  print_clayout<MMA_Traits<SM90_64x##N##x32_F32E4M3E4M3_SS_TN<>>>("f32", N); \
  print_clayout<MMA_Traits<SM90_64x##N##x32_F16E4M3E4M3_SS_TN<>>>("f16", N);

int main() {
  CL(8) CL(16) CL(24) CL(32) CL(40) CL(48) CL(56) CL(64)
  CL(72) CL(80) CL(88) CL(96) CL(104) CL(112) CL(120) CL(128)
  CL(136) CL(144) CL(152) CL(160) CL(168) CL(176) CL(184) CL(192)
  CL(200) CL(208) CL(216) CL(224) CL(232) CL(240) CL(248) CL(256)

  print_alayout<MMA_Traits<SM90_64x8x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>>>(16);
  print_alayout<MMA_Traits<SM90_64x8x32_F32E4M3E4M3_RS_TN<>>>(8);

  print_swizzle<1>();
  print_swizzle<2>();
  print_swizzle<3>();

  print_enc(0, 0, 0, 0, 0);
  print_enc(0x3fff, 0, 0, 0, 0);
  print_enc(0, 0x3fff, 0, 0, 0);
  print_enc(0, 0, 0x3fff, 0, 0);
  print_enc(0, 0, 0, 7, 0);
  print_enc(0, 0, 0, 0, 3);
  print_enc(0x1234, 0x0001, 0x0040, 0, 1);
  print_enc(0x0abc, 0x0100, 0x0020, 5, 2);
  print_enc(0x2001, 0x3001, 0x1002, 3, 3);

  print_all_atoms_and_tiles<uint8_t>();
  print_all_atoms_and_tiles<uint16_t>();
  print_all_atoms_and_tiles<uint32_t>();
  return 0;
}
