/*
 * dirtier: the test guest's workload. It gives a live migration something known to copy:
 *   1. touch: write non-zero data to every page of touch_mib MiB (pages QEMU must send in full);
 *   2. dirty: rewrite pages of a working set of wss_mib MiB at a paced rate_mib MiB/s, in sequential
 *      or random order; every write stores a new counter value so the page's content really changes
 *      (calc-dirty-rate page-sampling compares page hashes, not dirty bits); rate_mib=-1 does not pace
 *      at all: it writes as fast as the vCPU runs (a CPU-bound guest, the case the throttle slows);
 *   3. phases: with phase_s > 0 the working set moves to the next wss_mib of the touched arena every
 *      phase_s seconds (a working set that drifts over time);
 *   4. zeroed: write zeroed_mib MiB of pages, then zero them again and keep them: allocated zero pages,
 *      as a long-running guest has them (untouched guest RAM maps the host's shared zero page instead,
 *      which QEMU's zero-page check scans faster).
 * Parameters come from the kernel command line (/proc/cmdline), e.g.
 *   dirtier.touch_mib=64 dirtier.wss_mib=32 dirtier.rate_mib=20 dirtier.pattern=seq dirtier.phase_s=0
 * The kernel leaves "module.param" words it does not know in /proc/cmdline, so they reach us intact.
 * Prints "dirtier: ready" once touching is done and pacing has started; the host waits for that line.
 * Build: gcc -static -O2 -o dirtier dirtier.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define PAGES_PER_MIB (1024UL * 1024UL / PAGE_SIZE)
/* Pacing tick: short enough that the rate is smooth over a 50 ms measurement window. */
#define TICK_NS 5000000L

struct params {
    double zeroed_mib;
    double touch_mib;
    double wss_mib;
    double rate_mib;
    int random_order;
    double phase_s;
};

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    /* The console is the only channel to the host: write it unbuffered, line at a time. */
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > 0) {
        ssize_t unused = write(1, buf, (size_t)(n < (int)sizeof(buf) ? n : (int)sizeof(buf) - 1));
        (void)unused;
    }
}

/* Fails loudly: as PID 1 our exit panics the kernel, and with panic=-1 plus -no-reboot QEMU exits,
 * so the host sees the error line and a dead process instead of a guest that never gets ready. */
static void die(const char *what) {
    say("dirtier: error: %s\n", what);
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void parse_cmdline(struct params *p) {
    char line[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (f == NULL) die("cannot open /proc/cmdline");
    size_t n = fread(line, 1, sizeof(line) - 1, f);
    fclose(f);
    line[n] = '\0';
    for (char *tok = strtok(line, " \n"); tok != NULL; tok = strtok(NULL, " \n")) {
        if (strncmp(tok, "dirtier.", 8) != 0) continue;
        char *key = tok + 8;
        char *val = strchr(key, '=');
        if (val == NULL) continue;
        *val++ = '\0';
        if (strcmp(key, "touch_mib") == 0) p->touch_mib = atof(val);
        if (strcmp(key, "zeroed_mib") == 0) p->zeroed_mib = atof(val);
        else if (strcmp(key, "wss_mib") == 0) p->wss_mib = atof(val);
        else if (strcmp(key, "rate_mib") == 0) p->rate_mib = atof(val);
        else if (strcmp(key, "phase_s") == 0) p->phase_s = atof(val);
        else if (strcmp(key, "pattern") == 0) {
            if (strcmp(val, "seq") == 0) p->random_order = 0;
            else if (strcmp(val, "random") == 0) p->random_order = 1;
            else die("dirtier.pattern must be seq or random");
        } else {
            say("dirtier: warning: unknown parameter %s\n", key);
        }
    }
}

/* xorshift64: cheap, good enough to scatter writes; seeded fixed so runs are repeatable. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t next_random(void) {
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

int main(void) {
    struct params p = {.zeroed_mib = 0, .touch_mib = 64, .wss_mib = 32, .rate_mib = 0, .random_order = 0,
                       .phase_s = 0};
    parse_cmdline(&p);
    int unpaced = p.rate_mib == -1.0;
    if (p.touch_mib < 0 || p.wss_mib < 0 || (p.rate_mib < 0 && !unpaced) || p.phase_s < 0 || p.zeroed_mib < 0)
        die("negative parameter");

    unsigned long zeroed_pages = (unsigned long)(p.zeroed_mib * PAGES_PER_MIB);
    if (zeroed_pages > 0) {
        unsigned char *zeroed = mmap(NULL, zeroed_pages * PAGE_SIZE, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (zeroed == MAP_FAILED) die("mmap failed (guest memory too small for zeroed_mib?)");
        double z0 = now_s();
        for (unsigned long i = 0; i < zeroed_pages; i++) {
            memset(zeroed + i * PAGE_SIZE, 0xA5, PAGE_SIZE);
            memset(zeroed + i * PAGE_SIZE, 0, PAGE_SIZE);
        }
        say("dirtier: zeroed %lu pages in %.2f s\n", zeroed_pages, now_s() - z0);
    }

    unsigned long touch_pages = (unsigned long)(p.touch_mib * PAGES_PER_MIB);
    unsigned long wss_pages = (unsigned long)(p.wss_mib * PAGES_PER_MIB);
    /* The arena holds the touched pages; a working set larger than it extends it. */
    unsigned long arena_pages = touch_pages > wss_pages ? touch_pages : wss_pages;
    if (arena_pages == 0) arena_pages = 1;

    say("dirtier: touch_mib=%g wss_mib=%g rate_mib=%g pattern=%s phase_s=%g\n", p.touch_mib, p.wss_mib,
        p.rate_mib, p.random_order ? "random" : "seq", p.phase_s);

    unsigned char *arena = mmap(NULL, arena_pages * PAGE_SIZE, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED) die("mmap failed (guest memory too small for touch_mib/wss_mib?)");

    double t0 = now_s();
    for (unsigned long i = 0; i < touch_pages; i++) {
        /* Whole page non-zero: QEMU's zero-page check reads the page, a single word would do, but
         * full pages also make host RSS reflect the touched size. */
        memset(arena + i * PAGE_SIZE, 0x5A, PAGE_SIZE);
        *(uint64_t *)(arena + i * PAGE_SIZE) = i + 1;
    }
    say("dirtier: touched %lu pages in %.2f s\n", touch_pages, now_s() - t0);

    double pages_per_s = p.rate_mib * (double)PAGES_PER_MIB;
    uint64_t counter = 1;
    unsigned long cursor = 0;        /* next page in the working set (seq order) */
    unsigned long phase = 0;         /* how often the working set has moved */
    double start = now_s();
    double written = 0;              /* pages written since start (pacing ledger) */
    struct timespec tick = {.tv_sec = 0, .tv_nsec = TICK_NS};

    say("dirtier: ready\n");

    if (wss_pages == 0 || (pages_per_s <= 0 && !unpaced)) {
        for (;;) pause(); /* idle guest: memory stays as touched */
    }
    if (unpaced) {
        /* CPU-bound: no pacing and no sleep, one page after another for ever (the phase still moves). */
        for (;;) {
            if (p.phase_s > 0) {
                unsigned long ph = (unsigned long)((now_s() - start) / p.phase_s);
                if (ph != phase) {
                    phase = ph;
                    cursor = 0;
                }
            }
            unsigned long base = (phase * wss_pages) % arena_pages;
            for (unsigned long k = 0; k < 4096; k++) {
                unsigned long idx = p.random_order ? (unsigned long)(next_random() % wss_pages) : cursor;
                if (!p.random_order) cursor = (cursor + 1) % wss_pages;
                *(volatile uint64_t *)(arena + ((base + idx) % arena_pages) * PAGE_SIZE + 8) = ++counter;
            }
        }
    }

    for (;;) {
        double t = now_s() - start;
        if (p.phase_s > 0) {
            unsigned long ph = (unsigned long)(t / p.phase_s);
            if (ph != phase) {
                phase = ph;
                cursor = 0;
            }
        }
        unsigned long base = (phase * wss_pages) % arena_pages;
        /* Write what the schedule owes by now; after a stall (host busy) catch up at most one
         * second's worth so the rate does not burst far above the target. */
        double due = t * pages_per_s - written;
        if (due > pages_per_s) {
            written += due - pages_per_s;
            due = pages_per_s;
        }
        unsigned long batch = (unsigned long)due;
        for (unsigned long k = 0; k < batch; k++) {
            unsigned long idx;
            if (p.random_order) {
                idx = (unsigned long)(next_random() % wss_pages);
            } else {
                idx = cursor;
                cursor = (cursor + 1) % wss_pages;
            }
            unsigned long page = (base + idx) % arena_pages;
            /* A new value every write: content changes even if the page was written before. */
            *(volatile uint64_t *)(arena + page * PAGE_SIZE + 8) = ++counter;
        }
        written += (double)batch;
        while (nanosleep(&tick, &tick) != 0 && errno == EINTR) {
        }
        tick.tv_nsec = TICK_NS;
    }
}
