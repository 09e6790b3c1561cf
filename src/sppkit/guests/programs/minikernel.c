/*
 * minikernel - a small guest "kernel" whose structures a rootkit goes for, laid out
 * as real kernels lay them out: small security-critical objects sharing pages with
 * data the kernel writes all the time.  The host (`sppkit monitor`) write-protects
 * the critical bytes with SPP and must not disturb the hot data beside them.
 *
 *   idt          page 0   256 x 16-byte gates = exactly one page (Linux: idt_table,
 *                         page-aligned); written at boot only
 *   kdata        page 1   0x000-0x3FF  syscall_table[128]  function pointers (sub-pages 0-7)
 *                         0x400-0x47F  jiffies, nr_syscalls           hot (sub-page 8)
 *                         0x480-0x4FF  runqueue                        hot (sub-page 9)
 *                         0x500-0x8FF  syscall_count[128]              hot (sub-pages 10-17)
 *                         0x900-0xFFF  loadavg, scratch                hot (sub-pages 18-31)
 *   tasks        page 2   8 task structs of 512 bytes; in each:
 *                         +0x000 scheduler fields                       hot
 *                         +0x080 struct cred: usage (refcount, written by get_cred/put_cred),
 *                                securebits, uid..fsgid (+0x88, 32 B), capabilities (+0xA8, 40 B)
 *                         +0x100 comm, tgid, ppid                       boot only
 *                         +0x180 accounting (syscalls, rchar, wchar)    hot
 *
 * Symbols a monitor can name: idt, syscall_table, task<N>_cred, task<N>_ids,
 * task<N>_caps (N = 0..7), and the hot ones: kernel_hot, runqueue, syscall_count,
 * task<N>_sched, task<N>_acct.
 *
 * Run: boot (fill the IDT, the syscall table, the tasks) -> `out` 1 to port
 * sppkit_monitor_port ("kernel initialised: arm the monitor") -> stage 1, a workload
 * of param_ticks scheduler ticks, each with one system call through the table ->
 * `out` 2, stage 2: a rootkit overwrites syscall_table[__NR_getuid], the ids and
 * capabilities of task 3 and IDT gate 0x80 -> `out` 3 -> stage 3, more workload ->
 * checks.  The guest prints what it sees and returns a bit mask:
 *
 *   1  the system-call entry was hijacked (the table holds the rootkit's handler,
 *      or a getuid() call through the table reached it)
 *   2  task 3's credentials changed
 *   4  IDT gate 0x80 changed
 *   8  hot data is inconsistent (a counter or timestamp beside a protected
 *      structure lost a write)
 *
 * 0 = the attack had no effect and the hot data is intact.
 */
#include "sppkit_rt.h"

#define NR_SYSCALLS   128
#define NR_TASKS      8
#define VICTIM        3

#define __NR_read     0
#define __NR_write    1
#define __NR_open     2
#define __NR_close    3
#define __NR_getpid   39
#define __NR_getuid   102
#define __NR_geteuid  107
#define __NR_getppid  110

#define MON_PORT          0x510
#define MON_ARM           1
#define MON_ATTACK_BEGIN  2
#define MON_ATTACK_END    3

#define CAP_FULL_SET  0x1ffffffffffull
#define ENOSYS        38

#define EXIT_SYSCALL  1
#define EXIT_CREDS    2
#define EXIT_IDT      4
#define EXIT_HOT      8

/* The host reads this to learn that this guest arms its monitor by port. */
SPPKIT_USED const u16 sppkit_monitor_port = MON_PORT;

/* Parameters the host may patch before the run. */
volatile u64 param_ticks = 3000;
volatile u64 param_post_ticks = 500;

/* ---- the interrupt descriptor table ------------------------------------- */

struct idt_gate {
    u16 off_lo;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 off_mid;
    u32 off_hi;
    u32 reserved;
};
_Static_assert(sizeof(struct idt_gate) == 16, "gate size");

SPPKIT_PAGE_ALIGNED struct idt_gate idt[256];
_Static_assert(sizeof(idt) == SPPKIT_PAGE_SIZE, "the IDT is one page");

/* ---- kernel data: the system-call table and hot counters ----------------- */

struct task_struct;
typedef i64 (*syscall_fn)(struct task_struct *t, u64 arg);

struct runqueue {
    u64 nr_running;
    u64 nr_switches;
    u64 clock;
    u64 curr;
    u64 prev;
    u64 load;
    u64 pad[10];
};
_Static_assert(sizeof(struct runqueue) == 128, "runqueue is one sub-page");

struct kernel_data {
    syscall_fn syscall_table[NR_SYSCALLS];                 /* 0x000 */
    u64 jiffies;                                           /* 0x400 */
    u64 nr_syscalls;                                       /* 0x408 */
    u64 last_nr;                                           /* 0x410 */
    u64 hot_pad[13];
    struct runqueue rq;                                    /* 0x480 */
    u64 syscall_count[NR_SYSCALLS];                        /* 0x500 */
    u64 loadavg[3];                                        /* 0x900 */
    u64 scratch[221];                                      /* 0x918 */
};

#define KD_SYSCALL_TABLE_OFF  0x000
#define KD_HOT_OFF            0x400
#define KD_RQ_OFF             0x480
#define KD_COUNT_OFF          0x500
#define KD_LOADAVG_OFF        0x900

_Static_assert(sizeof(struct kernel_data) == SPPKIT_PAGE_SIZE, "kdata is one page");
_Static_assert(offsetof(struct kernel_data, syscall_table) == KD_SYSCALL_TABLE_OFF, "syscall_table");
_Static_assert(offsetof(struct kernel_data, jiffies) == KD_HOT_OFF, "jiffies");
_Static_assert(offsetof(struct kernel_data, rq) == KD_RQ_OFF, "rq");
_Static_assert(offsetof(struct kernel_data, syscall_count) == KD_COUNT_OFF, "syscall_count");
_Static_assert(offsetof(struct kernel_data, loadavg) == KD_LOADAVG_OFF, "loadavg");

SPPKIT_PAGE_ALIGNED struct kernel_data kdata;

SPPKIT_EXPORT_FIELD(syscall_table, kdata, 0x000, 0x400);
SPPKIT_EXPORT_FIELD(kernel_hot, kdata, 0x400, 0x80);
SPPKIT_EXPORT_FIELD(runqueue, kdata, 0x480, 0x80);
SPPKIT_EXPORT_FIELD(syscall_count, kdata, 0x500, 0x400);
SPPKIT_EXPORT_FIELD(loadavg, kdata, 0x900, 0x700);

/* ---- tasks with their credentials ----------------------------------------- */

struct cred {
    u32 usage;            /* +0x00 reference count */
    u32 securebits;       /* +0x04 */
    u32 uid, gid, suid, sgid, euid, egid, fsuid, fsgid;    /* +0x08 */
    u64 cap_inheritable;  /* +0x28 */
    u64 cap_permitted;
    u64 cap_effective;
    u64 cap_bprm;
    u64 cap_ambient;      /* +0x48 */
};
_Static_assert(sizeof(struct cred) == 80, "cred size");
_Static_assert(offsetof(struct cred, uid) == 0x08, "cred.uid");
_Static_assert(offsetof(struct cred, cap_inheritable) == 0x28, "cred.caps");

struct task_struct {
    /* +0x000 scheduler: written on every tick */
    u64 state;
    u64 pid;
    u64 prio;
    u64 utime;
    u64 stime;
    u64 nvcsw;
    u64 nivcsw;
    u64 last_ran;
    u64 run_next;
    u64 run_prev;
    u64 sched_pad[6];
    /* +0x080 credentials */
    struct cred cred SPPKIT_SUBPAGE_ALIGNED;
    u8 cred_pad[48];
    /* +0x100 identity: written at boot */
    char comm[16];
    u64 tgid;
    u64 ppid;
    u64 ident_pad[12];
    /* +0x180 accounting: written on every system call */
    u64 nr_syscalls;
    u64 rchar;
    u64 wchar;
    u64 open_files;
    u64 acct_pad[12];
};

#define TASK_SIZE       512
#define TASK_CRED_OFF   0x080
#define TASK_IDS_OFF    0x088
#define TASK_CAPS_OFF   0x0A8
#define TASK_ACCT_OFF   0x180

_Static_assert(sizeof(struct task_struct) == TASK_SIZE, "task size");
_Static_assert(offsetof(struct task_struct, cred) == TASK_CRED_OFF, "task.cred");
_Static_assert(offsetof(struct task_struct, cred.uid) == TASK_IDS_OFF, "task.cred.uid");
_Static_assert(offsetof(struct task_struct, cred.cap_inheritable) == TASK_CAPS_OFF, "task.cred.caps");
_Static_assert(offsetof(struct task_struct, nr_syscalls) == TASK_ACCT_OFF, "task.acct");

SPPKIT_PAGE_ALIGNED struct task_struct tasks[NR_TASKS];
_Static_assert(sizeof(tasks) == SPPKIT_PAGE_SIZE, "the tasks fill one page");

#define EXPORT_TASK(n)                                                              \
    SPPKIT_EXPORT_FIELD(task##n##_sched, tasks, n * 512 + 0x000, 0x80);             \
    SPPKIT_EXPORT_FIELD(task##n##_cred, tasks, n * 512 + 0x080, 80);                \
    SPPKIT_EXPORT_FIELD(task##n##_ids, tasks, n * 512 + 0x088, 32);                 \
    SPPKIT_EXPORT_FIELD(task##n##_caps, tasks, n * 512 + 0x0A8, 40);                \
    SPPKIT_EXPORT_FIELD(task##n##_acct, tasks, n * 512 + 0x180, 0x80)

EXPORT_TASK(0);
EXPORT_TASK(1);
EXPORT_TASK(2);
EXPORT_TASK(3);
EXPORT_TASK(4);
EXPORT_TASK(5);
EXPORT_TASK(6);
EXPORT_TASK(7);

/* ---- state outside the monitored pages ------------------------------------ */

u64 rootkit_calls;        /* how often the rootkit's handler ran */
u64 interrupts_taken;

/* ---- helpers ---------------------------------------------------------------- */

static SPPKIT_NOINLINE void monitor_notify(u32 what)
{
    outl(MON_PORT, what);
}

static inline void inc64(u64 *p, u64 by) { rt_write64(p, rt_read64(p) + by); }
static inline void inc32(u32 *p, u32 by) { rt_write32(p, rt_read32(p) + by); }

static void get_cred(struct cred *c) { inc32(&c->usage, 1); }
static void put_cred(struct cred *c) { inc32(&c->usage, (u32)-1); }

static void say(const char *s) { rt_puts("minikernel: "); rt_puts(s); }

/* ---- interrupt and system-call handlers (never actually taken) ------------- */

SPPKIT_NOINLINE void default_isr(void) { inc64(&interrupts_taken, 1); }
SPPKIT_NOINLINE void page_fault_isr(void) { inc64(&interrupts_taken, 1); }
SPPKIT_NOINLINE void timer_isr(void) { inc64(&interrupts_taken, 1); }
SPPKIT_NOINLINE void syscall_entry(void) { inc64(&interrupts_taken, 1); }

static i64 sys_ni_syscall(struct task_struct *t, u64 a) { (void)t; (void)a; return -ENOSYS; }
static i64 sys_getpid(struct task_struct *t, u64 a) { (void)a; return (i64)rt_read64(&t->pid); }
static i64 sys_getppid(struct task_struct *t, u64 a) { (void)a; return (i64)rt_read64(&t->ppid); }
static i64 sys_getuid(struct task_struct *t, u64 a) { (void)a; return rt_read32(&t->cred.uid); }
static i64 sys_geteuid(struct task_struct *t, u64 a) { (void)a; return rt_read32(&t->cred.euid); }

static i64 sys_read(struct task_struct *t, u64 a)
{
    inc64(&t->rchar, a);
    return (i64)a;
}

static i64 sys_write(struct task_struct *t, u64 a)
{
    inc64(&t->wchar, a);
    return (i64)a;
}

static i64 sys_open(struct task_struct *t, u64 a)
{
    (void)a;
    get_cred(&t->cred);          /* the file keeps a reference to the opener's creds */
    inc64(&t->open_files, 1);
    return 3;
}

static i64 sys_close(struct task_struct *t, u64 a)
{
    (void)a;
    inc64(&t->open_files, (u64)-1);
    put_cred(&t->cred);
    return 0;
}

/* The rootkit's replacement: everybody is root. */
SPPKIT_NOINLINE i64 evil_getuid(struct task_struct *t, u64 a)
{
    (void)t;
    (void)a;
    inc64(&rootkit_calls, 1);
    return 0;
}

SPPKIT_NOINLINE void evil_entry(void) { inc64(&rootkit_calls, 1); }

/* ---- boot ------------------------------------------------------------------ */

static void gate_words(void (*fn)(void), u64 *lo, u64 *hi)
{
    u64 a = (u64)(uintptr_t)fn;
    u64 type_attr = 0x8E;     /* present, DPL 0, 64-bit interrupt gate */
    *lo = (a & 0xFFFF) | (0x08ull << 16) | (type_attr << 40) | (((a >> 16) & 0xFFFF) << 48);
    *hi = a >> 32;
}

static void set_gate(int vector, void (*fn)(void), u8 dpl)
{
    u64 lo, hi;
    gate_words(fn, &lo, &hi);
    lo |= (u64)dpl << 45;
    rt_write64((u8 *)&idt[vector], lo);
    rt_write64((u8 *)&idt[vector] + 8, hi);
}

static void boot(void)
{
    for (int v = 0; v < 256; v++)
        set_gate(v, default_isr, 0);
    set_gate(14, page_fault_isr, 0);
    set_gate(32, timer_isr, 0);
    set_gate(0x80, syscall_entry, 3);

    for (int nr = 0; nr < NR_SYSCALLS; nr++)
        rt_write64(&kdata.syscall_table[nr], (u64)(uintptr_t)sys_ni_syscall);
    rt_write64(&kdata.syscall_table[__NR_read], (u64)(uintptr_t)sys_read);
    rt_write64(&kdata.syscall_table[__NR_write], (u64)(uintptr_t)sys_write);
    rt_write64(&kdata.syscall_table[__NR_open], (u64)(uintptr_t)sys_open);
    rt_write64(&kdata.syscall_table[__NR_close], (u64)(uintptr_t)sys_close);
    rt_write64(&kdata.syscall_table[__NR_getpid], (u64)(uintptr_t)sys_getpid);
    rt_write64(&kdata.syscall_table[__NR_getuid], (u64)(uintptr_t)sys_getuid);
    rt_write64(&kdata.syscall_table[__NR_geteuid], (u64)(uintptr_t)sys_geteuid);
    rt_write64(&kdata.syscall_table[__NR_getppid], (u64)(uintptr_t)sys_getppid);

    for (int i = 0; i < NR_TASKS; i++) {
        struct task_struct *t = &tasks[i];
        struct cred *c = &t->cred;
        u32 id = i == 0 ? 0 : 1000 + (u32)i;
        u64 caps = i == 0 ? CAP_FULL_SET : 0;
        rt_write64(&t->pid, (u64)i + 1);
        rt_write64(&t->tgid, (u64)i + 1);
        rt_write64(&t->ppid, i == 0 ? 0 : 1);
        rt_write64(&t->prio, 120);
        rt_write64(&t->run_next, (u64)(i + 1) % NR_TASKS);
        rt_write64(&t->run_prev, (u64)(i + NR_TASKS - 1) % NR_TASKS);
        rt_write8(&t->comm[0], i == 0 ? 'i' : 't');
        rt_write8(&t->comm[1], i == 0 ? 'n' : 'a');
        rt_write8(&t->comm[2], i == 0 ? 'i' : 's');
        rt_write8(&t->comm[3], i == 0 ? 't' : 'k');
        rt_write8(&t->comm[4], i == 0 ? 0 : (char)('0' + i));
        rt_write32(&c->usage, 1);
        rt_write32(&c->uid, id);
        rt_write32(&c->gid, id);
        rt_write32(&c->suid, id);
        rt_write32(&c->sgid, id);
        rt_write32(&c->euid, id);
        rt_write32(&c->egid, id);
        rt_write32(&c->fsuid, id);
        rt_write32(&c->fsgid, id);
        rt_write64(&c->cap_inheritable, 0);
        rt_write64(&c->cap_permitted, caps);
        rt_write64(&c->cap_effective, caps);
        rt_write64(&c->cap_bprm, 0);
        rt_write64(&c->cap_ambient, 0);
    }
    rt_write64(&kdata.rq.nr_running, NR_TASKS);
}

/* ---- the workload ------------------------------------------------------------ */

/* Shadow counts kept outside the monitored pages, to check the hot data at the end. */
struct shadow {
    u64 ticks;
    u64 syscalls;
    u64 count[NR_SYSCALLS];
    u64 task_syscalls[NR_TASKS];
    u64 rchar[NR_TASKS];
    u64 wchar[NR_TASKS];
    u64 switches;
    u64 clock;
};

static struct shadow sh;

static i64 do_syscall(struct task_struct *t, u32 nr, u64 arg)
{
    inc64(&kdata.nr_syscalls, 1);
    rt_write64(&kdata.last_nr, nr);
    inc64(&kdata.syscall_count[nr], 1);
    inc64(&t->nr_syscalls, 1);
    syscall_fn f = (syscall_fn)(uintptr_t)rt_read64(&kdata.syscall_table[nr]);
    return f(t, arg);
}

static const u32 syscall_mix[8] = {
    __NR_getpid, __NR_write, __NR_getuid, __NR_read, __NR_geteuid, __NR_write, __NR_getppid, __NR_read,
};

static void workload(u64 ticks, u64 *x)
{
    for (u64 i = 0; i < ticks; i++) {
        u64 r = *x;
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        *x = r;

        /* timer tick: jiffies, the run queue, the outgoing and incoming task */
        inc64(&kdata.jiffies, 1);
        sh.ticks++;
        u64 prev = rt_read64(&kdata.rq.curr);
        u64 next = (prev + 1) % NR_TASKS;
        u64 delta = 1000 + (r & 0xFF);
        inc64(&kdata.rq.clock, delta);
        sh.clock += delta;
        inc64(&kdata.rq.nr_switches, 1);
        sh.switches++;
        rt_write64(&kdata.rq.prev, prev);
        rt_write64(&kdata.rq.curr, next);
        rt_write64(&kdata.rq.load, r & 0x3FF);
        inc64(&tasks[prev].utime, delta);
        inc64(&tasks[prev].nvcsw, 1);
        rt_write64(&tasks[next].last_ran, rt_read64(&kdata.rq.clock));
        rt_write64(&tasks[next].state, 0);
        rt_write64(&tasks[prev].state, 1);
        rt_write64(&kdata.loadavg[i % 3], (r >> 8) & 0xFFFF);

        /* the incoming task makes one system call; every 16th tick it opens a file
         * (get_cred: the refcount beside the ids is written) and closes it again */
        struct task_struct *t = &tasks[next];
        u32 nr = syscall_mix[i % 8];
        u64 arg = (r >> 20) & 0xFFF;
        if (i % 16 == 15) {
            do_syscall(t, __NR_open, 0);
            do_syscall(t, __NR_close, 3);
            sh.count[__NR_open]++;
            sh.count[__NR_close]++;
            sh.task_syscalls[next] += 2;
            sh.syscalls += 2;
        }
        do_syscall(t, nr, arg);
        sh.count[nr]++;
        sh.task_syscalls[next]++;
        sh.syscalls++;
        if (nr == __NR_read)
            sh.rchar[next] += arg;
        if (nr == __NR_write)
            sh.wchar[next] += arg;
    }
}

/* ---- the rootkit ------------------------------------------------------------ */

static SPPKIT_NOINLINE void rootkit(void)
{
    struct cred *c = &tasks[VICTIM].cred;
    u64 lo, hi;

    rt_puts("rootkit: syscall_table[__NR_getuid] <- evil_getuid\n");
    rt_write64(&kdata.syscall_table[__NR_getuid], (u64)(uintptr_t)evil_getuid);

    rt_puts("rootkit: task 3 credentials <- root, all capabilities\n");
    rt_write32(&c->uid, 0);
    rt_write32(&c->gid, 0);
    rt_write32(&c->suid, 0);
    rt_write32(&c->sgid, 0);
    rt_write32(&c->euid, 0);
    rt_write32(&c->egid, 0);
    rt_write32(&c->fsuid, 0);
    rt_write32(&c->fsgid, 0);
    rt_write64(&c->cap_inheritable, CAP_FULL_SET);
    rt_write64(&c->cap_permitted, CAP_FULL_SET);
    rt_write64(&c->cap_effective, CAP_FULL_SET);

    rt_puts("rootkit: idt[0x80] <- evil_entry\n");
    gate_words(evil_entry, &lo, &hi);
    lo |= 3ull << 45;
    rt_write64((u8 *)&idt[0x80], lo);
    rt_write64((u8 *)&idt[0x80] + 8, hi);
}

/* ---- checks ------------------------------------------------------------------ */

static int check_hot(void)
{
    int bad = 0;
    u64 sum = 0, tsum = 0, sw = 0, utime = 0;
    if (rt_read64(&kdata.jiffies) != sh.ticks) {
        say("hot data: jiffies lost writes\n");
        bad = 1;
    }
    if (rt_read64(&kdata.rq.nr_switches) != sh.switches || rt_read64(&kdata.rq.clock) != sh.clock) {
        say("hot data: run queue lost writes\n");
        bad = 1;
    }
    if (rt_read64(&kdata.nr_syscalls) != sh.syscalls) {
        say("hot data: nr_syscalls lost writes\n");
        bad = 1;
    }
    for (int nr = 0; nr < NR_SYSCALLS; nr++) {
        u64 c = rt_read64(&kdata.syscall_count[nr]);
        sum += c;
        if (c != sh.count[nr])
            bad = 1;
    }
    for (int i = 0; i < NR_TASKS; i++) {
        struct task_struct *t = &tasks[i];
        tsum += rt_read64(&t->nr_syscalls);
        sw += rt_read64(&t->nvcsw);
        utime += rt_read64(&t->utime);
        if (rt_read64(&t->nr_syscalls) != sh.task_syscalls[i] || rt_read64(&t->rchar) != sh.rchar[i] ||
            rt_read64(&t->wchar) != sh.wchar[i] || rt_read64(&t->open_files) != 0 ||
            rt_read32(&t->cred.usage) != 1) {
            say("hot data: task ");
            rt_put_dec((u64)i);
            rt_puts(" accounting or cred refcount lost writes\n");
            bad = 1;
        }
    }
    if (sum != sh.syscalls || tsum != sh.syscalls || sw != sh.switches || utime != sh.clock)
        bad = 1;
    say("hot data: jiffies=");
    rt_put_dec(rt_read64(&kdata.jiffies));
    rt_puts(" syscalls=");
    rt_put_dec(rt_read64(&kdata.nr_syscalls));
    rt_puts(" switches=");
    rt_put_dec(rt_read64(&kdata.rq.nr_switches));
    rt_puts(bad ? " - INCONSISTENT\n" : " - consistent\n");
    return bad;
}

int main(void)
{
    u64 x = 0x2545f4914f6cdd1dull;
    u64 gate_lo, gate_hi;
    int code = 0;

    boot();
    gate_lo = rt_read64((u8 *)&idt[0x80]);
    gate_hi = rt_read64((u8 *)&idt[0x80] + 8);
    say("booted: idt 256 gates, syscall_table 128 entries, 8 tasks\n");
    monitor_notify(MON_ARM);

    workload(param_ticks, &x);
    say("stage 1: ");
    rt_put_dec(sh.ticks);
    rt_puts(" ticks, ");
    rt_put_dec(sh.syscalls);
    rt_puts(" system calls\n");

    monitor_notify(MON_ATTACK_BEGIN);
    rootkit();
    monitor_notify(MON_ATTACK_END);

    workload(param_post_ticks, &x);

    /* what the kernel sees after the attack */
    struct task_struct *v = &tasks[VICTIM];
    u64 entry = rt_read64(&kdata.syscall_table[__NR_getuid]);
    u64 calls_before = rt_read64(&rootkit_calls);
    i64 uid = do_syscall(v, __NR_getuid, 0);
    sh.count[__NR_getuid]++;
    sh.task_syscalls[VICTIM]++;
    sh.syscalls++;
    int hijacked = entry != (u64)(uintptr_t)sys_getuid || rt_read64(&rootkit_calls) != calls_before;
    say("getuid() of task 3 = ");
    rt_put_dec((u64)uid);
    rt_puts(hijacked ? " via evil_getuid - syscall table HIJACKED\n" : " via sys_getuid - syscall table intact\n");
    if (hijacked)
        code |= EXIT_SYSCALL;

    struct cred *c = &v->cred;
    u32 want = 1000 + VICTIM;
    int creds_ok = rt_read32(&c->uid) == want && rt_read32(&c->gid) == want && rt_read32(&c->suid) == want &&
                   rt_read32(&c->sgid) == want && rt_read32(&c->euid) == want && rt_read32(&c->egid) == want &&
                   rt_read32(&c->fsuid) == want && rt_read32(&c->fsgid) == want &&
                   rt_read64(&c->cap_inheritable) == 0 && rt_read64(&c->cap_permitted) == 0 &&
                   rt_read64(&c->cap_effective) == 0;
    say("task 3 creds: uid=");
    rt_put_dec(rt_read32(&c->uid));
    rt_puts(" euid=");
    rt_put_dec(rt_read32(&c->euid));
    rt_puts(" cap_effective=");
    rt_put_hex(rt_read64(&c->cap_effective));
    rt_puts(creds_ok ? " - intact\n" : " - ESCALATED\n");
    if (!creds_ok)
        code |= EXIT_CREDS;

    int idt_ok = rt_read64((u8 *)&idt[0x80]) == gate_lo && rt_read64((u8 *)&idt[0x80] + 8) == gate_hi;
    say("idt[0x80] -> ");
    u64 lo = rt_read64((u8 *)&idt[0x80]), hi = rt_read64((u8 *)&idt[0x80] + 8);
    rt_put_hex((lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | (hi << 32));
    rt_puts(idt_ok ? " (syscall_entry) - intact\n" : " - HOOKED\n");
    if (!idt_ok)
        code |= EXIT_IDT;

    if (check_hot())
        code |= EXIT_HOT;

    say(code & (EXIT_SYSCALL | EXIT_CREDS | EXIT_IDT) ? "verdict: the rootkit succeeded\n"
                                                       : "verdict: the rootkit had no effect\n");
    return code;
}
