/*
 * Self-checking workload of the rig's Linux guest: it runs as the
 * guest's init (under busybox) and judges, once a tick, the Xen PV
 * interfaces the kernel uses, printing one verdict line a tick on the
 * console (hvc0):
 *
 *   NCM tick=N domid=D up=MS gap=MS cs=xen ce=xen timer=ok ipi=ok
 *       xenbus=ok counter=ok mem=ok kmsg=K verdict=PASS
 *
 * cs/ce     the clocksource and clockevent devices in use (Xen's own
 *           when the PV clock and the PV singleshot timer drive them)
 * timer     a sleep returned and every vCPU's VIRQ_TIMER count moved
 * ipi       a ping-pong between threads pinned to two vCPUs raised the
 *           rescheduling/call-function IPI counts of both (event
 *           channels bound to IPIs)
 * xenbus    a write and a read back of a node of the guest's own
 *           xenstore area over /dev/xen/xenbus (the xenstore ring and
 *           its event channel)
 * counter   a counter page another thread increments moved forward, and
 *           the tick number stored beside it is the previous one
 * mem       every page of a checksummed region still matches its sum;
 *           some pages are rewritten (and summed again) every tick
 * kmsg      kernel log lines printed since the workload started, each
 *           also echoed as "NCM kmsg: ..."
 *
 * With PV devices (xen-blkfront's /dev/xvda, xen-netfront's eth0):
 *
 * blk       a thread writes checksummed 4 KiB blocks (O_DIRECT, a block
 *           number and a sequence number in each) round a region of the
 *           disk, reads each back and one written earlier: no I/O error,
 *           every block holds the last sequence number written there (a
 *           lost write or a replayed old one shows), and requests keep
 *           completing (stalled for STALL_TICKS ticks fails)
 * net       a thread sends numbered UDP datagrams to dom0's responder
 *           (10.99.0.1:7777), one at a time, resending after a second
 *           without an answer; each answer must carry the number sent
 *           (late answers to a resent one are counted apart), and the
 *           sequence must keep moving
 * xbs       each device's xenbus state, the frontend's (sysfs) and its
 *           backend's (xenstore), is Connected at every tick
 *
 * A thread of its own registers a xenstore watch on data/ncm-watch (its
 * own area) over a second /dev/xen/xenbus file and prints each event it
 * receives, numbered, the first being the one a new watch fires:
 *
 *   NCM watch n=N path=/local/domain/D/data/ncm-watch token=ncm-watch
 *
 * Anything else than ok prints verdict=FAIL with the reason.  The guest
 * never learns that it was saved or restored: nothing here cooperates.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define REGION_PAGES 8192 /* 32 MiB */
#define DIRTY_PER_TICK 512
#define MAX_CPUS 8
#define XS_READ 2
#define XS_WATCH 4
#define XS_WATCH_EVENT 15
#define XS_WRITE 11
#define XS_ERROR 16
#define DISK_BLOCKS 2048 /* 8 MiB of the disk */
#define STALL_TICKS 6

struct counter_page {
	volatile uint64_t spins;
	uint64_t tick;
	uint64_t magic;
};

static struct counter_page *counter;
static int ncpus;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

static void read_line(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");
	buf[0] = 0;
	if (!f) {
		snprintf(buf, len, "none");
		return;
	}
	if (!fgets(buf, len, f))
		snprintf(buf, len, "none");
	fclose(f);
	buf[strcspn(buf, "\n")] = 0;
}

/* Per vCPU: VIRQ_TIMER count, IPI (resched + callfunc) count. */
static void irq_counts(uint64_t timer[], uint64_t ipi[])
{
	char line[1024];
	FILE *f = fopen("/proc/interrupts", "r");
	memset(timer, 0, sizeof(uint64_t) * MAX_CPUS);
	memset(ipi, 0, sizeof(uint64_t) * MAX_CPUS);
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char *p = strchr(line, ':');
		uint64_t v[MAX_CPUS] = {0}, sum = 0;
		int i, cpu;
		if (!p || !strstr(line, "xen-percpu"))
			continue;
		p++;
		for (i = 0; i < ncpus; i++)
			sum += v[i] = strtoull(p, &p, 10);
		/* Named timerN / reschedN / callfuncN / callfuncsingleN. */
		if ((p = strstr(line, "timer")) && sscanf(p + 5, "%d", &cpu) == 1 &&
		    cpu < MAX_CPUS)
			timer[cpu] += sum;
		else if (((p = strstr(line, "resched")) &&
			  sscanf(p + 7, "%d", &cpu) == 1) ||
			 ((p = strstr(line, "callfuncsingle")) &&
			  sscanf(p + 14, "%d", &cpu) == 1) ||
			 ((p = strstr(line, "callfunc")) &&
			  sscanf(p + 8, "%d", &cpu) == 1))
			if (cpu < MAX_CPUS)
				ipi[cpu] += sum;
	}
	fclose(f);
}

/* -- xenbus over /dev/xen/xenbus -- */

struct xsd_sockmsg {
	uint32_t type, req_id, tx_id, len;
};

static int xs_fd = -1;
static uint32_t xs_req;

static int xs_call(uint32_t type, const char *a, const char *b, char *out,
		   size_t outlen)
{
	char buf[4096];
	struct xsd_sockmsg *m = (struct xsd_sockmsg *)buf;
	size_t la = strlen(a) + 1, lb = b ? strlen(b) : 0, got = 0;
	ssize_t n;

	if (xs_fd < 0)
		xs_fd = open("/dev/xen/xenbus", O_RDWR);
	if (xs_fd < 0)
		return -errno;
	m->type = type;
	m->req_id = ++xs_req;
	m->tx_id = 0;
	m->len = la + lb;
	memcpy(buf + sizeof(*m), a, la);
	if (b)
		memcpy(buf + sizeof(*m) + la, b, lb);
	if (write(xs_fd, buf, sizeof(*m) + la + lb) < 0)
		return -errno;
	while (got < sizeof(*m)) {
		n = read(xs_fd, buf + got, sizeof(buf) - got);
		if (n <= 0)
			return -EIO;
		got += n;
	}
	while (got < sizeof(*m) + m->len) {
		n = read(xs_fd, buf + got, sizeof(buf) - got);
		if (n <= 0)
			return -EIO;
		got += n;
	}
	if (m->req_id != xs_req || m->type == XS_ERROR)
		return -EPROTO;
	if (out) {
		size_t l = m->len < outlen - 1 ? m->len : outlen - 1;
		memcpy(out, buf + sizeof(*m), l);
		out[l] = 0;
	}
	return 0;
}

static int read_all(int fd, char *buf, size_t len)
{
	size_t got = 0;
	ssize_t n;

	while (got < len) {
		n = read(fd, buf + got, len - got);
		if (n <= 0)
			return -1;
		got += n;
	}
	return 0;
}

/* The watch: registered once, its events counted as they arrive. */
static void *watcher(void *arg)
{
	static const char req[] = "data/ncm-watch\0ncm-watch";
	char buf[4096];
	struct xsd_sockmsg *m = (struct xsd_sockmsg *)buf;
	unsigned long events = 0;
	int fd = open("/dev/xen/xenbus", O_RDWR);

	(void)arg;
	m->type = XS_WATCH;
	m->req_id = 1;
	m->tx_id = 0;
	m->len = sizeof(req);
	memcpy(buf + sizeof(*m), req, sizeof(req));
	if (fd < 0 || write(fd, buf, sizeof(*m) + sizeof(req)) < 0) {
		printf("NCM watch verdict=FAIL reason=register\n");
		return NULL;
	}
	for (;;) {
		if (read_all(fd, buf, sizeof(*m)) || m->len >= sizeof(buf) -
		    sizeof(*m) || read_all(fd, buf + sizeof(*m), m->len)) {
			printf("NCM watch verdict=FAIL reason=read\n");
			return NULL;
		}
		buf[sizeof(*m) + m->len] = 0;
		if (m->type == XS_WATCH_EVENT) {
			char *path = buf + sizeof(*m);
			printf("NCM watch n=%lu path=%s token=%s\n", ++events,
			       path, path + strlen(path) + 1);
		} else if (m->type == XS_WATCH) {
			printf("NCM watch registered\n");
		} else {
			printf("NCM watch verdict=FAIL reason=type:%u\n",
			       m->type);
		}
	}
}

/* -- threads -- */

static int pp[2][2];

static void *spinner(void *arg)
{
	(void)arg;
	pin(ncpus - 1);
	for (;;) {
		counter->spins++;
		usleep(10000); /* a timer on that vCPU, not a busy loop */
	}
	return NULL;
}

static void *ponger(void *arg)
{
	char c;
	(void)arg;
	pin(ncpus - 1);
	while (read(pp[0][0], &c, 1) == 1)
		if (write(pp[1][1], &c, 1) != 1)
			break;
	return NULL;
}

static int ping_pong(int rounds)
{
	char c = 'x';
	int i;
	for (i = 0; i < rounds; i++) {
		if (write(pp[0][1], &c, 1) != 1 || read(pp[1][0], &c, 1) != 1)
			return -1;
		usleep(1000); /* let the other vCPU go idle: a real wakeup */
	}
	return 0;
}

/* -- the checksummed region -- */

static uint64_t *region;
static uint64_t sums[REGION_PAGES];
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint64_t page_sum(const uint64_t *p)
{
	uint64_t s = 0xcbf29ce484222325ull;
	int i;
	for (i = 0; i < PAGE / 8; i++)
		s = (s ^ p[i]) * 0x100000001b3ull;
	return s;
}

static uint64_t page_sum_n(const uint64_t *p, int n)
{
	uint64_t s = 0xcbf29ce484222325ull;
	int i;
	for (i = 0; i < n; i++)
		s = (s ^ p[i]) * 0x100000001b3ull;
	return s;
}

/* The disk thread's own generator: the region's is the main thread's. */
static uint64_t rng_dev = 0x2545F4914F6CDD1Dull;

static uint64_t next_rand_dev(void)
{
	rng_dev ^= rng_dev << 13;
	rng_dev ^= rng_dev >> 7;
	rng_dev ^= rng_dev << 17;
	return rng_dev;
}

static void fill_page(int pg)
{
	uint64_t *p = region + (size_t)pg * (PAGE / 8);
	int i;
	for (i = 0; i < PAGE / 8; i++)
		p[i] = next_rand();
	sums[pg] = page_sum(p);
}

static int bad_pages(void)
{
	int pg, bad = 0;
	for (pg = 0; pg < REGION_PAGES; pg++)
		if (page_sum(region + (size_t)pg * (PAGE / 8)) != sums[pg])
			bad++;
	return bad;
}

/* -- PV devices -- */

static volatile uint64_t disk_ops, disk_err, disk_bad, net_seq, net_retx,
	net_late, net_bad;
static int have_disk, have_net;
static uint64_t disk_gen[DISK_BLOCKS];

static void fill_block(uint64_t *b, uint64_t seq, uint64_t blk)
{
	uint64_t x = seq * 0x9E3779B97F4A7C15ull ^ blk;
	int i;
	b[0] = 0x4e434d424c4f434bull;
	b[1] = seq;
	b[2] = blk;
	for (i = 3; i < PAGE / 8 - 1; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		b[i] = x;
	}
	b[PAGE / 8 - 1] = page_sum_n(b, PAGE / 8 - 1);
}

/* 0: holds sequence number seq of block blk, intact. */
static int check_block(const uint64_t *b, uint64_t seq, uint64_t blk)
{
	return b[0] != 0x4e434d424c4f434bull || b[1] != seq || b[2] != blk ||
	       b[PAGE / 8 - 1] != page_sum_n(b, PAGE / 8 - 1);
}

static void *disk_thread(void *arg)
{
	int fd = (int)(intptr_t)arg;
	uint64_t *w, *r, seq = 0;
	if (posix_memalign((void **)&w, PAGE, PAGE) ||
	    posix_memalign((void **)&r, PAGE, PAGE))
		return NULL;
	for (;;) {
		uint64_t blk = seq % DISK_BLOCKS, other;
		seq++;
		fill_block(w, seq, blk);
		if (pwrite(fd, w, PAGE, (off_t)blk * PAGE) != PAGE) {
			disk_err++;
			usleep(100000);
			continue;
		}
		disk_gen[blk] = seq;
		if (pread(fd, r, PAGE, (off_t)blk * PAGE) != PAGE)
			disk_err++;
		else if (check_block(r, seq, blk))
			disk_bad++;
		other = next_rand_dev() % DISK_BLOCKS;
		if (disk_gen[other]) {
			if (pread(fd, r, PAGE, (off_t)other * PAGE) != PAGE)
				disk_err++;
			else if (check_block(r, disk_gen[other], other))
				disk_bad++;
		}
		disk_ops++;
	}
	return NULL;
}

static void *net_thread(void *arg)
{
	int s = (int)(intptr_t)arg;
	uint64_t n = 1;
	char buf[64];
	for (;;) {
		struct pollfd pfd = {.fd = s, .events = POLLIN};
		int len = snprintf(buf, sizeof(buf), "%llu",
				   (unsigned long long)n);
		if (send(s, buf, len, 0) != len) {
			net_retx++;
			usleep(200000);
			continue;
		}
		for (;;) {
			ssize_t got;
			uint64_t v;
			if (poll(&pfd, 1, 1000) <= 0) {
				net_retx++; /* resend the same number */
				break;
			}
			got = recv(s, buf, sizeof(buf) - 1, 0);
			if (got <= 0)
				continue;
			buf[got] = 0;
			v = strtoull(buf, NULL, 10);
			if (v == n) {
				net_seq = n++;
				usleep(20000);
				break;
			}
			if (v < n)
				net_late++; /* an answer to a resent one */
			else
				net_bad++;
		}
	}
	return NULL;
}

static void start_devices(void)
{
	pthread_t t;
	int fd = open("/dev/xvda", O_RDWR | O_DIRECT);
	if (fd >= 0) {
		have_disk = 1;
		pthread_create(&t, NULL, disk_thread, (void *)(intptr_t)fd);
	}
	if (access("/sys/class/net/eth0", F_OK) == 0) {
		struct sockaddr_in me = {.sin_family = AF_INET,
					 .sin_port = htons(7777)};
		struct sockaddr_in peer = {.sin_family = AF_INET,
					   .sin_port = htons(7777)};
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		inet_pton(AF_INET, "10.99.0.2", &me.sin_addr);
		inet_pton(AF_INET, "10.99.0.1", &peer.sin_addr);
		if (s >= 0 && !bind(s, (struct sockaddr *)&me, sizeof(me)) &&
		    !connect(s, (struct sockaddr *)&peer, sizeof(peer))) {
			have_net = 1;
			pthread_create(&t, NULL, net_thread, (void *)(intptr_t)s);
		}
	}
}

/* Every xenbus device's frontend state (sysfs) and its backend's state
 * (xenstore): 0 when all are Connected. */
static int xenbus_states(char *why, size_t len)
{
	DIR *d = opendir("/sys/bus/xen/devices");
	struct dirent *e;
	int bad = 0;
	if (!d)
		return 0;
	while ((e = readdir(d))) {
		char path[512], val[128], be[600];
		if (e->d_name[0] == '.' || !strncmp(e->d_name, "console", 7))
			continue;
		snprintf(path, sizeof(path), "/sys/bus/xen/devices/%s/state",
			 e->d_name);
		read_line(path, val, sizeof(val));
		if (strcmp(val, "Connected")) {
			snprintf(why + strlen(why), len - strlen(why),
				 " xbs:%s:%s", e->d_name, val);
			bad++;
		}
		snprintf(path, sizeof(path), "/sys/bus/xen/devices/%s/nodename",
			 e->d_name);
		read_line(path, val, sizeof(val));
		snprintf(be, sizeof(be), "%s/backend", val);
		if (xs_call(XS_READ, be, NULL, path, sizeof(path)) == 0) {
			snprintf(be, sizeof(be), "%s/state", path);
			if (xs_call(XS_READ, be, NULL, val, sizeof(val)) ||
			    strcmp(val, "4")) {
				snprintf(why + strlen(why), len - strlen(why),
					 " xbs:%s:backend-%s", e->d_name, val);
				bad++;
			}
		}
	}
	closedir(d);
	return bad;
}

/* -- the kernel's log -- */

static int kmsg_fd = -1;

static int new_kmsg(void)
{
	char rec[2048];
	int lines = 0;
	ssize_t n;
	for (;;) {
		n = read(kmsg_fd, rec, sizeof(rec) - 1);
		if (n < 0 && errno == EPIPE)
			continue; /* overwritten records: keep reading */
		if (n <= 0)
			break;
		rec[n] = 0;
		char *text = strchr(rec, ';');
		text = text ? text + 1 : rec;
		text[strcspn(text, "\n")] = 0;
		printf("NCM kmsg: %s\n", text);
		lines++;
	}
	return lines;
}

int main(void)
{
	uint64_t timer0[MAX_CPUS], ipi0[MAX_CPUS], timer1[MAX_CPUS],
		ipi1[MAX_CPUS];
	uint64_t start, last, tick = 0, spins_before, max_gap = 0;
	char domid[64] = "?", cs[64], ce[64], val[64], want[64];
	pthread_t t;
	int i, kmsg_total = 0, disk_still = 0, net_still = 0;
	uint64_t disk_last = 0, net_last = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	ncpus = sysconf(_SC_NPROCESSORS_ONLN);
	if (ncpus > MAX_CPUS)
		ncpus = MAX_CPUS;
	counter = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	region = mmap(NULL, (size_t)REGION_PAGES * PAGE, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (counter == MAP_FAILED || region == MAP_FAILED) {
		printf("NCM verdict=FAIL reason=mmap\n");
		return 1;
	}
	counter->magic = 0x4e434d434f554e54ull;
	for (i = 0; i < REGION_PAGES; i++)
		fill_page(i);
	kmsg_fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);
	if (kmsg_fd >= 0)
		lseek(kmsg_fd, 0, SEEK_END);
	if (pipe(pp[0]) || pipe(pp[1]) ||
	    pthread_create(&t, NULL, ponger, NULL) ||
	    pthread_create(&t, NULL, spinner, NULL) ||
	    pthread_create(&t, NULL, watcher, NULL)) {
		printf("NCM verdict=FAIL reason=threads\n");
		return 1;
	}
	pin(0);
	xs_call(XS_READ, "domid", NULL, domid, sizeof(domid));
	start_devices();
	printf("NCM start domid=%s vcpus=%d region=%dKiB disk=%d net=%d\n",
	       domid, ncpus, REGION_PAGES * 4, have_disk, have_net);
	start = last = now_ns();
	irq_counts(timer0, ipi0);
	for (;;) {
		char reasons[512] = "";
		uint64_t t0, gap;
		int bad, kmsg;

		spins_before = counter->spins;
		t0 = now_ns();
		usleep(500000);
		if (now_ns() - t0 < 500000000ull)
			strcat(reasons, " timer:early");
		if (ncpus > 1 && ping_pong(20))
			strcat(reasons, " ipi:pipe");
		tick++;
		gap = (now_ns() - last) / 1000000;
		last = now_ns();
		if (gap > max_gap)
			max_gap = gap;

		read_line("/sys/devices/system/clocksource/clocksource0/"
			  "current_clocksource", cs, sizeof(cs));
		read_line("/sys/devices/system/clockevents/clockevent0/"
			  "current_device", ce, sizeof(ce));
		if (strcmp(cs, "xen"))
			strcat(reasons, " cs");
		if (strcmp(ce, "xen"))
			strcat(reasons, " ce");

		irq_counts(timer1, ipi1);
		for (i = 0; i < ncpus; i++) {
			char what[32];
			if (timer1[i] <= timer0[i]) {
				snprintf(what, sizeof(what), " timer:still:%d", i);
				strcat(reasons, what);
			}
			if (ncpus > 1 && ipi1[i] <= ipi0[i]) {
				snprintf(what, sizeof(what), " ipi:still:%d", i);
				strcat(reasons, what);
			}
		}
		memcpy(timer0, timer1, sizeof(timer0));
		memcpy(ipi0, ipi1, sizeof(ipi0));

		snprintf(want, sizeof(want), "%llu", (unsigned long long)tick);
		if (xs_call(XS_WRITE, "data/ncm-tick", want, NULL, 0) ||
		    xs_call(XS_READ, "data/ncm-tick", NULL, val, sizeof(val)) ||
		    strcmp(val, want))
			strcat(reasons, " xenbus");

		if (counter->spins <= spins_before ||
		    counter->tick != tick - 1 ||
		    counter->magic != 0x4e434d434f554e54ull)
			strcat(reasons, " counter");
		counter->tick = tick;

		bad = bad_pages();
		if (bad)
			strcat(reasons, " mem");
		for (i = 0; i < DIRTY_PER_TICK; i++)
			fill_page(next_rand() % REGION_PAGES);

		/* Counted over ticks: the first one after a long pause may
		 * end before the device's next completion. */
		if (have_disk) {
			uint64_t ops = disk_ops;
			disk_still = ops == disk_last ? disk_still + 1 : 0;
			disk_last = ops;
			if (disk_err)
				strcat(reasons, " blk:error");
			if (disk_bad)
				strcat(reasons, " blk:bad-block");
			if (disk_still >= STALL_TICKS)
				strcat(reasons, " blk:stalled");
		}
		if (have_net) {
			uint64_t seq = net_seq;
			net_still = seq == net_last ? net_still + 1 : 0;
			net_last = seq;
			if (net_bad)
				strcat(reasons, " net:bad-answer");
			if (net_still >= STALL_TICKS)
				strcat(reasons, " net:stalled");
		}
		xenbus_states(reasons, sizeof(reasons));

		kmsg = kmsg_fd >= 0 ? new_kmsg() : -1;
		if (kmsg > 0)
			kmsg_total += kmsg;

		printf("NCM tick=%llu domid=%s up=%llu gap=%llu maxgap=%llu "
		       "cs=%s ce=%s timer=%s ipi=%s xenbus=%s counter=%s "
		       "mem=%s kmsg=%d blk=%s disk=%llu/%llu/%llu net=%s "
		       "netseq=%llu retx=%llu late=%llu xbs=%s "
		       "verdict=%s%s%s\n",
		       (unsigned long long)tick, domid,
		       (unsigned long long)((last - start) / 1000000),
		       (unsigned long long)gap, (unsigned long long)max_gap,
		       cs, ce,
		       strstr(reasons, "timer") ? "bad" : "ok",
		       ncpus < 2 ? "none" :
		       strstr(reasons, "ipi") ? "bad" : "ok",
		       strstr(reasons, "xenbus") ? "bad" : "ok",
		       strstr(reasons, "counter") ? "bad" : "ok",
		       bad ? "bad" : "ok", kmsg_total,
		       !have_disk ? "none" :
		       strstr(reasons, "blk:") ? "bad" : "ok",
		       (unsigned long long)disk_ops,
		       (unsigned long long)disk_err,
		       (unsigned long long)disk_bad,
		       !have_net ? "none" :
		       strstr(reasons, "net:") ? "bad" : "ok",
		       (unsigned long long)net_seq,
		       (unsigned long long)net_retx,
		       (unsigned long long)net_late,
		       strstr(reasons, "xbs:") ? "bad" : "ok",
		       reasons[0] ? "FAIL" : "PASS",
		       reasons[0] ? " reasons=" : "", reasons + !!reasons[0]);
	}
}
