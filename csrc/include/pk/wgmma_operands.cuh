// pk/wgmma_operands.cuh — the accumulator operand lists of the inline-asm wgmma wrappers
// (pk/ptx.cuh, pk/wgmma_bf16.cuh, pk/wgmma_narrow.cuh, pk/ptx_mla.cuh), written once.
//
// Why macros: an asm statement takes no array as one operand, and nvcc neither expands a
// parameter pack in an asm operand list ("expected a )") nor supports named %[x] operands
// (internal error), so a wrapper whose fragment has n f32 accumulators must spell them twice,
// as the placeholders "%0, ..., %<n-1>" inside the instruction and as the n "+f" outputs:
//   PK_WGMMA_D(n)                        "%0, %1, ..., %<n-1>"
//   PK_WGMMA_D_OPERANDS(n, d)            "+f"(d[0]), ..., "+f"(d[n-1])
//   PK_WGMMA_D_OPERANDS_FROM(n, d, i0)   "+f"(d[i0]), ..., "+f"(d[i0 + n-1])
// for n = 8, 16, ..., 128 and 36 (m64n72: 72 / 2). The accumulators are operands 0 .. n-1;
// the inputs a wrapper lists after them are %n, %n+1, ... . n must be a literal (pasted).
#pragma once

#define PK_WGMMA_D(n) PK_WGMMA_D_##n
#define PK_WGMMA_D_OPERANDS(n, d) PK_WGMMA_D_OPERANDS_FROM(n, d, 0)
#define PK_WGMMA_D_OPERANDS_FROM(n, d, i0) PK_WGMMA_D_OPERANDS_##n(d, i0)

// Placeholders, eight more per step.
#define PK_WGMMA_D_8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define PK_WGMMA_D_16 PK_WGMMA_D_8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define PK_WGMMA_D_24 PK_WGMMA_D_16 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define PK_WGMMA_D_32 PK_WGMMA_D_24 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define PK_WGMMA_D_36 PK_WGMMA_D_32 ", %32, %33, %34, %35"
#define PK_WGMMA_D_40 PK_WGMMA_D_32 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define PK_WGMMA_D_48 PK_WGMMA_D_40 ", %40, %41, %42, %43, %44, %45, %46, %47"
#define PK_WGMMA_D_56 PK_WGMMA_D_48 ", %48, %49, %50, %51, %52, %53, %54, %55"
#define PK_WGMMA_D_64 PK_WGMMA_D_56 ", %56, %57, %58, %59, %60, %61, %62, %63"
#define PK_WGMMA_D_72 PK_WGMMA_D_64 ", %64, %65, %66, %67, %68, %69, %70, %71"
#define PK_WGMMA_D_80 PK_WGMMA_D_72 ", %72, %73, %74, %75, %76, %77, %78, %79"
#define PK_WGMMA_D_88 PK_WGMMA_D_80 ", %80, %81, %82, %83, %84, %85, %86, %87"
#define PK_WGMMA_D_96 PK_WGMMA_D_88 ", %88, %89, %90, %91, %92, %93, %94, %95"
#define PK_WGMMA_D_104 PK_WGMMA_D_96 ", %96, %97, %98, %99, %100, %101, %102, %103"
#define PK_WGMMA_D_112 PK_WGMMA_D_104 ", %104, %105, %106, %107, %108, %109, %110, %111"
#define PK_WGMMA_D_120 PK_WGMMA_D_112 ", %112, %113, %114, %115, %116, %117, %118, %119"
#define PK_WGMMA_D_128 PK_WGMMA_D_120 ", %120, %121, %122, %123, %124, %125, %126, %127"

// Read-write f32 constraints, in the same steps.
#define PK_WGMMA_F32X4(d, i) "+f"(d[(i) + 0]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3])
#define PK_WGMMA_F32X8(d, i) PK_WGMMA_F32X4(d, i), PK_WGMMA_F32X4(d, (i) + 4)
#define PK_WGMMA_D_OPERANDS_8(d, i0) PK_WGMMA_F32X8(d, i0)
#define PK_WGMMA_D_OPERANDS_16(d, i0) PK_WGMMA_D_OPERANDS_8(d, i0), PK_WGMMA_F32X8(d, (i0) + 8)
#define PK_WGMMA_D_OPERANDS_24(d, i0) PK_WGMMA_D_OPERANDS_16(d, i0), PK_WGMMA_F32X8(d, (i0) + 16)
#define PK_WGMMA_D_OPERANDS_32(d, i0) PK_WGMMA_D_OPERANDS_24(d, i0), PK_WGMMA_F32X8(d, (i0) + 24)
#define PK_WGMMA_D_OPERANDS_36(d, i0) PK_WGMMA_D_OPERANDS_32(d, i0), PK_WGMMA_F32X4(d, (i0) + 32)
#define PK_WGMMA_D_OPERANDS_40(d, i0) PK_WGMMA_D_OPERANDS_32(d, i0), PK_WGMMA_F32X8(d, (i0) + 32)
#define PK_WGMMA_D_OPERANDS_48(d, i0) PK_WGMMA_D_OPERANDS_40(d, i0), PK_WGMMA_F32X8(d, (i0) + 40)
#define PK_WGMMA_D_OPERANDS_56(d, i0) PK_WGMMA_D_OPERANDS_48(d, i0), PK_WGMMA_F32X8(d, (i0) + 48)
#define PK_WGMMA_D_OPERANDS_64(d, i0) PK_WGMMA_D_OPERANDS_56(d, i0), PK_WGMMA_F32X8(d, (i0) + 56)
#define PK_WGMMA_D_OPERANDS_72(d, i0) PK_WGMMA_D_OPERANDS_64(d, i0), PK_WGMMA_F32X8(d, (i0) + 64)
#define PK_WGMMA_D_OPERANDS_80(d, i0) PK_WGMMA_D_OPERANDS_72(d, i0), PK_WGMMA_F32X8(d, (i0) + 72)
#define PK_WGMMA_D_OPERANDS_88(d, i0) PK_WGMMA_D_OPERANDS_80(d, i0), PK_WGMMA_F32X8(d, (i0) + 80)
#define PK_WGMMA_D_OPERANDS_96(d, i0) PK_WGMMA_D_OPERANDS_88(d, i0), PK_WGMMA_F32X8(d, (i0) + 88)
#define PK_WGMMA_D_OPERANDS_104(d, i0) PK_WGMMA_D_OPERANDS_96(d, i0), PK_WGMMA_F32X8(d, (i0) + 96)
#define PK_WGMMA_D_OPERANDS_112(d, i0) PK_WGMMA_D_OPERANDS_104(d, i0), PK_WGMMA_F32X8(d, (i0) + 104)
#define PK_WGMMA_D_OPERANDS_120(d, i0) PK_WGMMA_D_OPERANDS_112(d, i0), PK_WGMMA_F32X8(d, (i0) + 112)
#define PK_WGMMA_D_OPERANDS_128(d, i0) PK_WGMMA_D_OPERANDS_120(d, i0), PK_WGMMA_F32X8(d, (i0) + 120)
