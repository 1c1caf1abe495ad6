/*
 * memtrace microbenchmark: the cost of one malloc+free pair, as the traced process sees it.
 *
 *   malloc_pair [ITERATIONS [SIZE [START_FILE]]]
 *
 * Prints "waiting pid=N" and, when START_FILE is given, waits until it exists (so that a
 * tracer can attach first). Then times ITERATIONS pairs of malloc(SIZE) + free and prints
 *   result ns_per_pair=<float> iterations=<n> size=<bytes>
 * and exits. Sizes vary slightly around SIZE (SIZE + i % 16) so that the allocator's fast
 * path is exercised the way a real program does, not one cached chunk.
 *
 * Build: gcc -O2 -fno-omit-frame-pointer -fno-builtin -o malloc_pair malloc_pair.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void *volatile sink;

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

__attribute__((noinline)) static void pair(size_t size)
{
	void *p = malloc(size);
	sink = p;
	free(p);
}

int main(int argc, char **argv)
{
	long iterations = argc > 1 ? atol(argv[1]) : 1000000;
	size_t size = argc > 2 ? (size_t)atol(argv[2]) : 64;
	const char *start = argc > 3 ? argv[3] : NULL;
	if (iterations <= 0) {
		fprintf(stderr, "usage: %s [ITERATIONS [SIZE [START_FILE]]]\n", argv[0]);
		return 2;
	}
	printf("waiting pid=%d\n", (int)getpid());
	fflush(stdout);
	if (start) {
		struct timespec tick = { .tv_sec = 0, .tv_nsec = 10000000L };
		while (access(start, F_OK) != 0)
			nanosleep(&tick, NULL);
	}
	double t0 = now_ns();
	for (long i = 0; i < iterations; i++)
		pair(size + (size_t)(i % 16));
	double t1 = now_ns();
	printf("result ns_per_pair=%.1f iterations=%ld size=%zu\n", (t1 - t0) / (double)iterations,
	       iterations, size);
	fflush(stdout);
	return 0;
}
