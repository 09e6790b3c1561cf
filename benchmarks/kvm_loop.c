/*
 * kvm_loop.c - the bare C baseline of benchmarks/bench_kvm.py.
 *
 * Runs the same flat guest binary as sppkit's KvmEngine (benchmarks/kvm_guest.S) in
 * the same machine set-up (64-bit long mode, identity-mapped 2-MiB pages, CPL 0 or
 * 3 with IOPL 3, the supported CPUID), with nothing between KVM_RUN and the guest
 * but the minimum: a write to the read-only page is committed with one memcpy into
 * the backing memory, exactly what an allow decision does, and the loop re-enters.
 *
 *   kvm_loop kvm GUEST.BIN LOAD_GPA RO_GPA CPL RAM_MIB
 *       RO_GPA = 0: no read-only page (the guest runs unprotected).
 *       Prints {"seconds": ..., "mmio_writes": ..., "io": ..., "result": ...}; the
 *       time covers the KVM_RUN loop only (set-up excluded), as bench_kvm.py times
 *       KvmEngine.run() only.
 *   kvm_loop native N
 *       Calls spin(N, buf) from kvm_guest.S (linked into this program) on the host.
 *       Prints {"seconds": ..., "result": ...}.
 *
 * Built by bench_kvm.py: gcc -O2 kvm_loop.c kvm_guest.S -o kvm_loop
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

extern uint64_t spin(uint64_t n, uint64_t *buf);

#define PAGE 4096ull
#define PML4 0x1000ull
#define PTE_P 1ull
#define PTE_RW 2ull
#define PTE_US 4ull
#define PTE_PS 0x80ull

static void die(const char *what)
{
    fprintf(stderr, "kvm_loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void add_slot(int vm, uint32_t slot, uint64_t gpa, uint64_t size, void *host, uint32_t flags)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)host,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
}

static void set_seg(struct kvm_segment *s, uint16_t sel, uint8_t type, uint8_t dpl, int code)
{
    memset(s, 0, sizeof *s);
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->dpl = dpl;
    s->db = code ? 0 : 1;
    s->s = 1;
    s->l = code ? 1 : 0;
    s->g = 1;
}

static int run_kvm(const char *bin, uint64_t load, uint64_t ro, int cpl, uint64_t ram_mib)
{
    uint64_t ram_size = ram_mib << 20;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0)
        die("KVM_SET_TSS_ADDR");
    uint8_t *ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap RAM");

    /* the guest image */
    int fd = open(bin, O_RDONLY);
    if (fd < 0)
        die(bin);
    struct stat st;
    fstat(fd, &st);
    if (read(fd, ram + load, st.st_size) != st.st_size)
        die("read guest");
    close(fd);

    /* identity page tables, 2-MiB pages, as sppkit.engines.x86.identity_tables */
    uint64_t fl = PTE_P | PTE_RW | (cpl == 3 ? PTE_US : 0);
    uint64_t *pml4 = (uint64_t *)(ram + PML4), *pdpt = (uint64_t *)(ram + PML4 + PAGE),
             *pd = (uint64_t *)(ram + PML4 + 2 * PAGE);
    pml4[0] = (PML4 + PAGE) | fl;
    pdpt[0] = (PML4 + 2 * PAGE) | fl;
    for (uint64_t j = 0; j < ram_size >> 21; j++)
        pd[j] = (j << 21) | fl | PTE_PS;

    /* memslots: RW below, the read-only page, RW above (the engine's projection) */
    if (ro) {
        add_slot(vm, 0, 0, ro, ram, 0);
        add_slot(vm, 1, ro, PAGE, ram + ro, KVM_MEM_READONLY);
        add_slot(vm, 2, ro + PAGE, ram_size - ro - PAGE, ram + ro + PAGE, 0);
    } else {
        add_slot(vm, 0, 0, ram_size, ram, 0);
    }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    /* the supported CPUID, as KvmEngine sets it */
    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    uint16_t csel = cpl == 3 ? 0x1b : 0x08, dsel = cpl == 3 ? 0x23 : 0x10;
    set_seg(&sregs.cs, csel, 11, cpl, 1);
    set_seg(&sregs.ds, dsel, 3, cpl, 0);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 = 0x80050033;                 /* PE MP ET NE WP AM PG */
    sregs.cr3 = PML4;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10); /* PAE OSFXSR OSXMMEXCPT */
    sregs.efer = (1 << 8) | (1 << 10);      /* LME LMA */
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = load;
    regs.rsp = ram_size;
    regs.rflags = cpl == 3 ? 0x3002 : 0x2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t mmio = 0, io = 0;
    double t0 = now();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_MMIO && run->mmio.is_write) {
            memcpy(ram + run->mmio.phys_addr, run->mmio.data, run->mmio.len); /* commit */
            mmio++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
            io++;
            if (run->io.port == 0xf4)
                break;
            continue;
        }
        fprintf(stderr, "kvm_loop: unexpected exit reason %u\n", run->exit_reason);
        return 1;
    }
    double t = now() - t0;
    uint64_t result;
    memcpy(&result, ram + load + 32, 8); /* param_result */
    printf("{\"seconds\": %.9f, \"mmio_writes\": %llu, \"io\": %llu, \"result\": %llu}\n", t,
           (unsigned long long)mmio, (unsigned long long)io, (unsigned long long)result);
    return 0;
}

static uint64_t buf[512];

int main(int argc, char **argv)
{
    if (argc == 7 && !strcmp(argv[1], "kvm"))
        return run_kvm(argv[2], strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0), atoi(argv[5]),
                       strtoull(argv[6], 0, 0));
    if (argc == 3 && !strcmp(argv[1], "native")) {
        uint64_t n = strtoull(argv[2], 0, 0);
        double t0 = now();
        uint64_t r = spin(n, buf);
        double t = now() - t0;
        printf("{\"seconds\": %.9f, \"result\": %llu}\n", t, (unsigned long long)r);
        return 0;
    }
    fprintf(stderr, "usage: kvm_loop kvm GUEST.BIN LOAD_GPA RO_GPA CPL RAM_MIB | kvm_loop native N\n");
    return 2;
}
