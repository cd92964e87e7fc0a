// Flags in shared memory for the collectives of tensor-parallel ranks on one host (engine/parallel/shm_collectives.py).
// Each rank's counter sits on its own cache line; a rank publishes n once its part of call n is in place
// (release), and a rank reads the parts of call n once every counter says n (acquire).
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

void shm_publish(int64_t *flag, int64_t value) { __atomic_store_n(flag, value, __ATOMIC_RELEASE); }

void shm_set(int64_t *flag, int64_t value) { __atomic_store_n(flag, value, __ATOMIC_SEQ_CST); }

static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + 1e-9 * (double)(now.tv_nsec - start->tv_nsec);
}

// Wait until flags[r * stride] >= target for every rank r < size. Returns 0 then; 1 if `abort_flag` was set,
// 2 if one of `pids` no longer exists (a child must be reaped for that: a zombie still exists) or this process's
// parent is no longer `parent` (0: not checked; a process whose parent died is handed to another at once), 3 after
// `timeout_s`. Spins first (a peer a few microseconds behind), then yields, then sleeps in short naps (a peer still
// computing), checking the abort flag, the peers and the clock.
int shm_wait(const int64_t *flags, int stride, int size, int64_t target, const int64_t *abort_flag,
             const int32_t *pids, int npids, int32_t parent, double timeout_s) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (uint64_t spin = 0;; spin++) {
        int ready = 1;
        for (int r = 0; r < size && ready; r++)
            ready = __atomic_load_n(flags + (int64_t)r * stride, __ATOMIC_ACQUIRE) >= target;
        if (ready) return 0;
        if (spin < 1024) {
            CPU_RELAX();
            continue;
        }
        if ((spin & 63) == 0) {
            if (__atomic_load_n(abort_flag, __ATOMIC_ACQUIRE)) return 1;
            for (int i = 0; i < npids; i++)
                if (kill((pid_t)pids[i], 0) != 0 && errno == ESRCH) return 2;
            if (parent != 0 && getppid() != (pid_t)parent) return 2;
            if (seconds_since(&start) > timeout_s) return 3;
        }
        if (spin < 1024 + 512) {
            sched_yield();
        } else {
            struct timespec nap = {0, 20000};
            nanosleep(&nap, NULL);
        }
    }
}
