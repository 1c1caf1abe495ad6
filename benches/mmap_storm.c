/*
 * Event-rate benchmark target: maps, touches and unmaps 64 KiB as fast as it can, for
 * SECONDS seconds, then prints how many rounds it made. Every round is one mmap event
 * (with a stack copy), one page fault per page touched (sampled) and one munmap event.
 * With RATE, it paces itself to RATE rounds per second (0: as fast as it can).
 *
 *   mmap_storm SECONDS [RATE]
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void round_trip(void)
{
	char *p = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	for (int off = 0; off < 65536; off += 4096)
		p[off] = 1;
	munmap(p, 65536);
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 10;
	double rate = argc > 2 ? atof(argv[2]) : 0;
	double start = now();
	double end = start + seconds;
	long rounds = 0;
	while (now() < end) {
		for (int i = 0; i < 100; i++)
			round_trip();
		rounds += 100;
		if (rate > 0) {
			/* Ahead of the pace: sleep until the schedule catches up. */
			double ahead = start + rounds / rate - now();
			if (ahead > 0) {
				struct timespec ts = { (time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9) };
				nanosleep(&ts, NULL);
			}
		}
	}
	printf("%ld rounds in %.1fs: %.0f rounds/s\n", rounds, seconds, rounds / seconds);
	return 0;
}
