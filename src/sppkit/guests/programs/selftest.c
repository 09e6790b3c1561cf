/*
 * selftest - the KVM SPP selftest scenario.
 *
 * `protected_page` is one page-aligned 4096-byte array.  The guest writes a 4-byte
 * value at the start of each of its 32 sub-pages, then reads them all back and
 * reports how many writes stuck.  With the page fully protected and the decision
 * SKIP, none stick ("0/32"); unprotected, all 32 do.  Returns 0 either way: the
 * console line and the host's violation log carry the result.
 *
 * Exported: protected_page (object, 4096 B, page aligned), stuck (object, u32: the
 * count of writes that stuck, for the host to read after the run).
 */
#include "sppkit_rt.h"

SPPKIT_PAGE_ALIGNED u8 protected_page[SPPKIT_PAGE_SIZE];
u32 stuck;

#define SELFTEST_VALUE(i) (0x5a5a0000u | (u32)(i))

int main(void)
{
    u32 n = 0;

    rt_puts("selftest: writing 32 sub-pages of protected_page at ");
    rt_put_hex((u64)(uintptr_t)protected_page);
    rt_putc('\n');

    for (u32 i = 0; i < SPPKIT_SUBPAGES; i++)
        rt_write32(&protected_page[i * SPPKIT_SUBPAGE_SIZE], SELFTEST_VALUE(i));

    for (u32 i = 0; i < SPPKIT_SUBPAGES; i++)
        if (rt_read32(&protected_page[i * SPPKIT_SUBPAGE_SIZE]) == SELFTEST_VALUE(i))
            n++;

    rt_write32(&stuck, n);
    rt_puts("selftest: ");
    rt_put_dec(n);
    rt_puts("/32 writes stuck, ");
    rt_put_dec(SPPKIT_SUBPAGES - n);
    rt_puts(" blocked\n");
    return 0;
}
