/*
 * mixed - a workload that mixes many unprotected writes with rare protected ones.
 *
 * Three page-aligned "shared pages", each holding a small structure worth
 * protecting in whole 128-byte sub-pages of its own, next to hot data in other
 * sub-pages of the same page:
 *
 *   keys_page    0x000-0x0FF  hot      u64[32]  hot counters            (sub-pages 0-1)
 *                0x100-0x11F  secret   struct secret {u64 key[4]}       (sub-page 2)
 *                0x180-0x1FF  stats    u64[16]  warm statistics         (sub-page 3)
 *   config_page  0x000-0x017  config   struct config                    (sub-page 0)
 *                0x080-0xFFF  ring     u64[496] hot ring log            (sub-pages 1-31)
 *   canary_page  0x000-0x7FF  scratch  u64[256] hot scratch             (sub-pages 0-15)
 *                0x800-0x87F  canary   u64[16]                          (sub-page 16)
 *                0x880-0xFFF  tail     u64[240] hot scratch             (sub-pages 17-31)
 *
 * The loop runs `param_iterations` times; every iteration writes hot[], ring[],
 * scratch[] and tail[] (never a protected sub-page).  Every `param_secret_every`
 * iterations it rotates secret.key[], every `param_config_every` it rewrites
 * config.checksum, every `param_canary_every` it overwrites one canary word.  The
 * host may patch the param_* words before the run.  A policy protecting secret,
 * config and canary therefore sees exactly secret_writes + config_writes +
 * canary_writes violations, which the guest prints and stores in writes_*.
 *
 * All stores are plain volatile integer stores.  Returns 0.
 */
#include "sppkit_rt.h"

struct secret {
    u64 key[4];
};

struct keys_page {
    u64 hot[32];                             /* 0x000 */
    struct secret secret SPPKIT_SUBPAGE_ALIGNED; /* 0x100 */
    u64 stats[16] SPPKIT_SUBPAGE_ALIGNED;    /* 0x180 */
    u8 rest[SPPKIT_PAGE_SIZE - 0x200];       /* 0x200 */
};

struct config {
    u32 mode;
    u32 threshold;
    u64 flags;
    u64 checksum;
};

struct config_page {
    struct config config;                    /* 0x000 */
    u64 ring[496] SPPKIT_SUBPAGE_ALIGNED;    /* 0x080 */
};

struct canary_page {
    u64 scratch[256];                        /* 0x000 */
    u64 canary[16];                          /* 0x800 */
    u64 tail[240];                           /* 0x880 */
};

/* The layout the header comment (and any policy) relies on. */
#define HOT_OFF       0x000
#define HOT_SIZE      0x100
#define SECRET_OFF    0x100
#define SECRET_SIZE   32
#define STATS_OFF     0x180
#define STATS_SIZE    0x80
#define CONFIG_OFF    0x000
#define CONFIG_SIZE   24
#define RING_OFF      0x080
#define RING_SIZE     0xF80
#define SCRATCH_OFF   0x000
#define SCRATCH_SIZE  0x800
#define CANARY_OFF    0x800
#define CANARY_SIZE   0x80
#define TAIL_OFF      0x880
#define TAIL_SIZE     0x780

_Static_assert(sizeof(struct keys_page) == SPPKIT_PAGE_SIZE, "keys_page is one page");
_Static_assert(offsetof(struct keys_page, hot) == HOT_OFF, "hot");
_Static_assert(sizeof(((struct keys_page *)0)->hot) == HOT_SIZE, "hot size");
_Static_assert(offsetof(struct keys_page, secret) == SECRET_OFF, "secret");
_Static_assert(sizeof(struct secret) == SECRET_SIZE, "secret size");
_Static_assert(offsetof(struct keys_page, stats) == STATS_OFF, "stats");
_Static_assert(sizeof(((struct keys_page *)0)->stats) == STATS_SIZE, "stats size");
_Static_assert(sizeof(struct config_page) == SPPKIT_PAGE_SIZE, "config_page is one page");
_Static_assert(offsetof(struct config_page, config) == CONFIG_OFF, "config");
_Static_assert(sizeof(struct config) == CONFIG_SIZE, "config size");
_Static_assert(offsetof(struct config_page, ring) == RING_OFF, "ring");
_Static_assert(sizeof(((struct config_page *)0)->ring) == RING_SIZE, "ring size");
_Static_assert(sizeof(struct canary_page) == SPPKIT_PAGE_SIZE, "canary_page is one page");
_Static_assert(offsetof(struct canary_page, scratch) == SCRATCH_OFF, "scratch");
_Static_assert(offsetof(struct canary_page, canary) == CANARY_OFF, "canary");
_Static_assert(sizeof(((struct canary_page *)0)->canary) == CANARY_SIZE, "canary size");
_Static_assert(offsetof(struct canary_page, tail) == TAIL_OFF, "tail");
_Static_assert(sizeof(((struct canary_page *)0)->tail) == TAIL_SIZE, "tail size");

SPPKIT_PAGE_ALIGNED struct keys_page keys_page = {
    .secret = {{0x0123456789abcdefull, 0xfedcba9876543210ull, 0x0f1e2d3c4b5a6978ull, 0x8796a5b4c3d2e1f0ull}},
};
SPPKIT_PAGE_ALIGNED struct config_page config_page = {
    .config = {.mode = 1, .threshold = 100, .flags = 0x5, .checksum = 0},
};
SPPKIT_PAGE_ALIGNED struct canary_page canary_page;

/* Field symbols a policy can name (objects, global). */
SPPKIT_EXPORT_FIELD(hot, keys_page, HOT_OFF, HOT_SIZE);
SPPKIT_EXPORT_FIELD(secret, keys_page, SECRET_OFF, SECRET_SIZE);
SPPKIT_EXPORT_FIELD(stats, keys_page, STATS_OFF, STATS_SIZE);
SPPKIT_EXPORT_FIELD(config, config_page, CONFIG_OFF, CONFIG_SIZE);
SPPKIT_EXPORT_FIELD(ring, config_page, RING_OFF, RING_SIZE);
SPPKIT_EXPORT_FIELD(scratch, canary_page, SCRATCH_OFF, SCRATCH_SIZE);
SPPKIT_EXPORT_FIELD(canary, canary_page, CANARY_OFF, CANARY_SIZE);
SPPKIT_EXPORT_FIELD(tail, canary_page, TAIL_OFF, TAIL_SIZE);

/* Parameters the host may patch before the run. */
volatile u64 param_iterations = 2048;
volatile u64 param_secret_every = 64;
volatile u64 param_config_every = 256;
volatile u64 param_canary_every = 512;

/* Totals, for the host to read after the run. */
u64 writes_hot;
u64 writes_secret;
u64 writes_config;
u64 writes_canary;

static void put_total(const char *what, u64 v)
{
    rt_puts("mixed: ");
    rt_puts(what);
    rt_puts(" = ");
    rt_put_dec(v);
    rt_putc('\n');
}

int main(void)
{
    u64 n = param_iterations;
    u64 se = param_secret_every ? param_secret_every : 1;
    u64 ce = param_config_every ? param_config_every : 1;
    u64 ke = param_canary_every ? param_canary_every : 1;
    u64 hot_w = 0, secret_w = 0, config_w = 0, canary_w = 0;
    u64 x = 0x2545f4914f6cdd1dull;

    rt_puts("mixed: ");
    rt_put_dec(n);
    rt_puts(" iterations, secret every ");
    rt_put_dec(se);
    rt_puts(", config every ");
    rt_put_dec(ce);
    rt_puts(", canary every ");
    rt_put_dec(ke);
    rt_putc('\n');

    for (u64 i = 1; i <= n; i++) {
        /* xorshift: cheap, register-only. */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;

        /* Hot data: 5 writes per iteration, never to a protected sub-page. */
        u64 *h = &keys_page.hot[i % 32];
        rt_write64(h, rt_read64(h) + i);
        rt_write64(&keys_page.stats[i % 16], x);
        rt_write64(&config_page.ring[i % 496], i ^ x);
        rt_write64(&canary_page.scratch[x % 256], i);
        rt_write32(&canary_page.tail[i % 240], (u32)x);
        hot_w += 5;

        if (i % se == 0) {
            u64 *k = &keys_page.secret.key[(i / se) % 4];
            rt_write64(k, rt_read64(k) ^ x);
            secret_w++;
        }
        if (i % ce == 0) {
            rt_write64(&config_page.config.checksum, x);
            config_w++;
        }
        if (i % ke == 0) {
            rt_write64(&canary_page.canary[(i / ke) % 16], i);
            canary_w++;
        }
    }

    rt_write64(&writes_hot, hot_w);
    rt_write64(&writes_secret, secret_w);
    rt_write64(&writes_config, config_w);
    rt_write64(&writes_canary, canary_w);

    u64 hot_sum = 0;
    for (int j = 0; j < 32; j++)
        hot_sum += rt_read64(&keys_page.hot[j]);

    put_total("hot writes", hot_w);
    put_total("secret writes", secret_w);
    put_total("config writes", config_w);
    put_total("canary writes", canary_w);
    put_total("protected writes", secret_w + config_w + canary_w);
    rt_puts("mixed: hot sum = ");
    rt_put_hex(hot_sum);
    rt_puts(", secret.key[0] = ");
    rt_put_hex(rt_read64(&keys_page.secret.key[0]));
    rt_puts(", config.checksum = ");
    rt_put_hex(rt_read64(&config_page.config.checksum));
    rt_putc('\n');
    return 0;
}
