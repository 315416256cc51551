// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * tailweave's socket capture: the kernel half of the native `ebpf` receiver.
 *
 * Licence: dual GPL-2.0-only / BSD-2-Clause. The kernel sees the GPL-compatible "Dual BSD/GPL"
 * licence string below, which the GPL-only helpers used here (bpf_probe_read_user, ringbuf)
 * require.
 *
 * One BTF-typed program on the raw `sys_exit` tracepoint covers the read/write family (read,
 * write, readv, writev, recvfrom, sendto, recvmsg, sendmsg; sendfile/splice counted, close
 * cleaned up). At exit the saved user registers still hold the arguments and the tracepoint
 * passes the return value, so no enter/exit map is needed, and a raw tracepoint attaches by name:
 * no tracefs mount, no CAP_DAC_READ_SEARCH. (fentry/fexit would be cheaper for other syscalls but
 * the target kernels refuse trampolines.) For each TCP socket syscall of a watched process that
 * moved bytes it emits one event into a ring buffer: the socket 4-tuple, the TCP sequence number
 * of the first byte, the thread's syscall trace id and the first bytes of the payload (across up
 * to MAX_IOV iovecs for readv/writev/recvmsg/sendmsg; bytes beyond them are counted as cut).
 * Parsing happens in user space.
 *
 * Filtering comes before any copy: self, watch-all, pid, then cgroup (the task's ancestor at each
 * configured level against the watched cgroup ids, so descendants count), and only then the
 * leader's comm, which is read only if a comm filter exists or the event needs it.
 *
 * Syscall trace ids (the semantics of DeepFlow's syscall_trace_id): a thread gets a new id when
 * it starts reading a message from a socket (a read that does not continue a read on the same
 * socket); writes reuse the thread's current id. So a server's inbound request and the calls it
 * makes while serving it carry one id.
 *
 * Wake-ups are batched: a record wakes the reader only when the unread data crosses a multiple of
 * wakeup_bytes (not on every record past it); the reader also polls on a timer. Records that do
 * not fit are counted, never waited for.
 *
 * Regenerate receivers/bpf/tailweave_socket.bpf.o with `make -C receivers/bpf` (clang, bpftool).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define CAP_MAX 1024
/* iovecs of one readv/writev/recvmsg/sendmsg the payload copy walks; the rest is counted as cut. */
#define MAX_IOV 8
/* Cgroup levels (depth below the cgroup v2 root) the cgroup filter can match at. */
#define MAX_CGROUP_LEVEL 32
#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define IPPROTO_TCP 6
#define SOCK_STREAM 1
#define RCV_SHUTDOWN 1

enum dir { DIR_EGRESS = 0, DIR_INGRESS = 1 };
enum kind { KIND_DATA = 0, KIND_CLOSE = 1 };
/* x86_64 syscall numbers. */
#define NR_READ 0
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDFILE 40
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#define NR_SPLICE 275

enum sys {
	SYS_READ = 0, SYS_WRITE, SYS_READV, SYS_WRITEV, SYS_RECVFROM, SYS_SENDTO,
	SYS_RECVMSG, SYS_SENDMSG, SYS_CLOSE,
};
/* Indexes of the `counters` per-CPU array (user space names them). */
enum counter {
	C_EVENTS = 0,      /* records written */
	C_RINGBUF_FULL,    /* records lost: ring buffer full */
	C_READ_FAULT,      /* payload copy from user memory failed */
	C_UNPARSED_SYSCALL,/* sendfile/splice on a watched socket: bytes not captured */
	C_IOV_CUT,         /* capture stopped at MAX_IOV iovecs before capture_bytes */
	C_MAX,
};

/* Set by user space before attaching. */
struct config {
	__u32 self_tgid;     /* never captured */
	__u32 watch_all;     /* 1: every process except self */
	__u32 capture_bytes; /* payload prefix per syscall, <= CAP_MAX */
	__u32 wakeup_bytes;  /* wake the reader each time unread data passes a multiple of this */
	__u32 cgroup_levels; /* bit n: some watched cgroup sits at level n (0: no cgroup filter) */
	__u32 n_comms;       /* entries in watch_comms (0: the comm is read only for events) */
};

/* The record layout user space decodes (receivers/src/ebpf/event.rs); little endian, packed. */
struct event {
	__u64 ts_ns;      /* bpf_ktime_get_ns at syscall exit */
	__u64 sk;         /* socket address: the socket's identity while it lives */
	__u64 trace_id;   /* the thread's syscall trace id */
	__u32 tgid;
	__u32 tid;
	__u32 fd;
	__u32 seq;        /* TCP sequence number of the first byte moved */
	__u32 total_len;  /* bytes the syscall moved */
	__u16 cap_len;    /* bytes of data[] that are valid */
	__u8 kind;
	__u8 dir;
	__u8 family;
	__u8 syscall;
	__u16 lport;      /* host order */
	__u16 rport;      /* host order */
	__u16 pad;
	__u8 laddr[16];
	__u8 raddr[16];
	char comm[16];    /* the process (thread group leader) name */
	__u8 data[CAP_MAX];
} __attribute__((packed));

struct thread_state {
	__u64 trace_id;
	__u64 last_sk;
	__u32 last_dir;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} watch_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, char[16]);
	__type(value, __u8);
} watch_comms SEC(".maps");

/* cgroup v2 ids (the directory's inode) whose processes, and their descendants', are watched. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u8);
} watch_cgroups SEC(".maps");

/* Sockets with one of these local or remote ports are never captured (tailweave's own). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u16);
	__type(value, __u8);
} skip_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct thread_state);
} threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} trace_id_counter SEC(".maps");

/* (tgid << 32 | fd) -> socket, for the sockets events were sent for: close and sendfile look here. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} live_fds SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/*
 * The event is built here, then copied into the ring buffer at its real size. The spill lets the
 * verifier accept an iovec copy at any offset below CAP_MAX of up to CAP_MAX bytes; the logic
 * never writes past data[CAP_MAX].
 */
struct scratch_buf {
	struct event e;
	__u8 spill[CAP_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch_buf);
} scratch SEC(".maps");

/* Size set by user space at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} events SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config_map, &zero);
}

static __always_inline void read_comm(char *comm)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_struct *leader = BPF_CORE_READ(task, group_leader);
	/* The key is all 16 bytes: clear what the string copy leaves behind. */
	__builtin_memset(comm, 0, 16);
	bpf_core_read_str(comm, 16, &leader->comm);
}

/* Is the current task in (or below) one of the watched cgroups? */
static __always_inline int in_watched_cgroup(__u32 levels)
{
	for (int lvl = 0; lvl < MAX_CGROUP_LEVEL; lvl++) {
		if (!(levels >> lvl))
			break;
		if (!((levels >> lvl) & 1))
			continue;
		__u64 id = bpf_get_current_ancestor_cgroup_id(lvl);
		if (id && bpf_map_lookup_elem(&watch_cgroups, &id))
			return 1;
	}
	return 0;
}

/*
 * Is the current process watched? The cheap checks come first; the leader's comm is read only
 * when a comm filter needs it or the process is watched (the event carries it).
 */
static __always_inline int watched(struct config *cfg, __u32 tgid, char *comm)
{
	if (tgid == cfg->self_tgid)
		return 0;
	int hit = cfg->watch_all || bpf_map_lookup_elem(&watch_pids, &tgid) ||
		  (cfg->cgroup_levels && in_watched_cgroup(cfg->cgroup_levels));
	if (!hit && !cfg->n_comms)
		return 0;
	read_comm(comm);
	return hit || bpf_map_lookup_elem(&watch_comms, comm);
}

/* The TCP socket behind fd in the current task, or NULL. */
static __always_inline struct sock *tcp_sock_of_fd(__u32 fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt)
		return NULL;
	__u32 max_fds = BPF_CORE_READ(fdt, max_fds);
	if (fd >= max_fds)
		return NULL;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = NULL;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return NULL;
	umode_t mode = BPF_CORE_READ(f, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *sock = BPF_CORE_READ(f, private_data);
	if (!sock)
		return NULL;
	struct sock *sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return NULL;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return NULL;
	if (BPF_CORE_READ(sk, sk_type) != SOCK_STREAM || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return NULL;
	return sk;
}

static __always_inline int fill_tuple(struct event *e, struct sock *sk)
{
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	e->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (bpf_map_lookup_elem(&skip_ports, &e->lport) || bpf_map_lookup_elem(&skip_ports, &e->rport))
		return -1;
	__builtin_memset(e->laddr, 0, 16);
	__builtin_memset(e->raddr, 0, 16);
	if (e->family == AF_INET) {
		__u32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(e->laddr, &l, 4);
		__builtin_memcpy(e->raddr, &r, 4);
	} else {
		BPF_CORE_READ_INTO(&e->laddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&e->raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	return 0;
}

static __always_inline __u64 next_trace_id(struct thread_state *st, __u64 sk, __u32 dir)
{
	if (dir == DIR_INGRESS && !(st->last_dir == DIR_INGRESS && st->last_sk == sk)) {
		__u32 zero = 0;
		__u64 *ctr = bpf_map_lookup_elem(&trace_id_counter, &zero);
		if (ctr)
			st->trace_id = __sync_fetch_and_add(ctr, 1) + 1;
	}
	st->last_sk = sk;
	st->last_dir = dir;
	return st->trace_id;
}

/*
 * Wake the reader each time the unread data crosses a multiple of wakeup_bytes, not on every
 * record past it: a reader still busy with the last batch would otherwise be woken (an IPI on
 * the writer's CPU) once per record. Two CPUs racing past the same multiple may both skip the
 * wake-up; the reader's poll timer bounds that delay.
 */
static __always_inline __u64 wake_flags(struct config *cfg, __u64 size)
{
	__u64 w = cfg->wakeup_bytes;
	if (!w)
		return BPF_RB_FORCE_WAKEUP;
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	return avail / w != (avail + size) / w ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline void emit(struct config *cfg, struct event *e, __u64 size)
{
	if (bpf_ringbuf_output(&events, e, size, wake_flags(cfg, size)))
		count(C_RINGBUF_FULL);
	else
		count(C_EVENTS);
}

/*
 * Copies the first `want` bytes spread over a user iovec array into dst, walking at most
 * MAX_IOV entries. Returns the bytes copied; sets *cut when entries beyond MAX_IOV held bytes
 * that fit, and *fault when user memory could not be read.
 */
static __always_inline __u32 copy_iov(__u8 *dst, const struct iovec *iov, __u64 iovcnt,
				      __u32 want, int *cut, int *fault)
{
	__u32 off = 0;
	int i;
	for (i = 0; i < MAX_IOV; i++) {
		if (i >= iovcnt || off >= want)
			return off;
		struct iovec v = {};
		if (bpf_probe_read_user(&v, sizeof(v), &iov[i])) {
			*fault = 1;
			return off;
		}
		__u64 len = v.iov_len;
		if (len > want - off)
			len = want - off;
		/* No-ops for the logic (off < want <= CAP_MAX): bounds the verifier can see. */
		off &= CAP_MAX - 1;
		if (len > CAP_MAX)
			len = CAP_MAX;
		if (len && bpf_probe_read_user(dst + off, len, v.iov_base)) {
			*fault = 1;
			return off;
		}
		off += len;
	}
	if (off < want && iovcnt > MAX_IOV)
		*cut = 1;
	return off;
}

/*
 * The common exit path, ret bytes moved: the payload is either one user buffer (buf, buf_len)
 * or, when iov is set, an iovec array of iovcnt entries.
 */
static __always_inline int on_data(__u32 fd, const void *buf, __u64 buf_len,
				   const struct iovec *iov, __u64 iovcnt, long ret, __u8 dir,
				   __u8 sys)
{
	if (ret <= 0)
		return 0;
	struct config *cfg = get_config();
	if (!cfg)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	__u32 zero = 0;
	struct scratch_buf *sb = bpf_map_lookup_elem(&scratch, &zero);
	if (!sb)
		return 0;
	struct event *e = &sb->e;
	if (!watched(cfg, tgid, e->comm))
		return 0;
	struct sock *sk = tcp_sock_of_fd(fd);
	if (!sk)
		return 0;
	if (fill_tuple(e, sk))
		return 0;

	struct tcp_sock *tp = (struct tcp_sock *)sk;
	__u32 seq_after;
	if (dir == DIR_EGRESS) {
		seq_after = BPF_CORE_READ(tp, write_seq);
	} else {
		seq_after = BPF_CORE_READ(tp, copied_seq);
		/*
		 * A read that consumed the peer's FIN advanced copied_seq by one more than the bytes
		 * it returned. FIN received (RCV_SHUTDOWN) and nothing left unread means it did.
		 */
		__u8 shut = BPF_CORE_READ(sk, sk_shutdown);
		if ((shut & RCV_SHUTDOWN) && seq_after == BPF_CORE_READ(tp, rcv_nxt))
			seq_after -= 1;
	}

	struct thread_state fresh = {}, *st = bpf_map_lookup_elem(&threads, &tid);
	if (!st) {
		bpf_map_update_elem(&threads, &tid, &fresh, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&threads, &tid);
		if (!st)
			return 0;
	}
	e->trace_id = next_trace_id(st, (__u64)sk, dir);
	e->ts_ns = bpf_ktime_get_ns();
	e->sk = (__u64)sk;
	e->tgid = tgid;
	e->tid = tid;
	e->fd = fd;
	e->total_len = ret > 0xffffffff ? 0xffffffff : (__u32)ret;
	e->seq = seq_after - (__u32)ret;
	e->kind = KIND_DATA;
	e->dir = dir;
	e->syscall = sys;
	e->pad = 0;

	__u64 n = ret;
	if (n > cfg->capture_bytes)
		n = cfg->capture_bytes;
	if (n > CAP_MAX)
		n = CAP_MAX;
	e->cap_len = 0;
	if (iov) {
		int cut = 0, fault = 0;
		e->cap_len = copy_iov(sb->e.data, iov, iovcnt, n, &cut, &fault);
		if (cut)
			count(C_IOV_CUT);
		if (fault)
			count(C_READ_FAULT);
	} else if (buf) {
		if (n > buf_len)
			n = buf_len;
		__u32 len = n;
		if (len > CAP_MAX)
			len = CAP_MAX;
		if (len && bpf_probe_read_user(e->data, len, buf))
			count(C_READ_FAULT);
		else
			e->cap_len = len;
	}

	/* An LRU update replaces the node: only write when the fd is new or names a new socket. */
	__u64 fdkey = (pid_tgid & 0xffffffff00000000ULL) | fd;
	__u64 skv = (__u64)sk;
	__u64 *known = bpf_map_lookup_elem(&live_fds, &fdkey);
	if (!known || *known != skv)
		bpf_map_update_elem(&live_fds, &fdkey, &skv, BPF_ANY);

	__u64 size = offsetof(struct event, data) + e->cap_len;
	if (size > sizeof(struct event))
		size = sizeof(struct event);
	emit(cfg, e, size);
	return 0;
}

/* The iovec array and its length of a user msghdr. */
static __always_inline int msg_iov(const struct user_msghdr *m, const struct iovec **iov,
				   __u64 *iovcnt)
{
	struct user_msghdr h = {};
	if (!m || bpf_probe_read_user(&h, sizeof(h), m))
		return -1;
	*iov = h.msg_iov;
	*iovcnt = h.msg_iovlen;
	return 0;
}

/* A socket fd of a watched process was closed: user space drops the socket's state. */
static __always_inline int on_close(__u32 fd)
{
	struct config *cfg = get_config();
	if (!cfg)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 key = (pid_tgid & 0xffffffff00000000ULL) | fd;
	__u64 *skp = bpf_map_lookup_elem(&live_fds, &key);
	if (!skp)
		return 0;
	__u32 zero = 0;
	struct scratch_buf *sb = bpf_map_lookup_elem(&scratch, &zero);
	if (!sb) {
		bpf_map_delete_elem(&live_fds, &key);
		return 0;
	}
	struct event *e = &sb->e;
	__builtin_memset(e, 0, offsetof(struct event, data));
	e->sk = *skp;
	bpf_map_delete_elem(&live_fds, &key);
	e->ts_ns = bpf_ktime_get_ns();
	e->tgid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->fd = fd;
	e->kind = KIND_CLOSE;
	e->syscall = SYS_CLOSE;
	emit(cfg, e, offsetof(struct event, data));
	return 0;
}

/*
 * One program on the raw sys_exit tracepoint (BTF-typed, attached without tracefs): the saved
 * user registers still hold the syscall's arguments, the tracepoint passes its return value.
 * Everything but the few syscalls below leaves at the first compare.
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(tw_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = regs->orig_ax;
	const struct iovec *iov = NULL;
	__u64 iovcnt = 0;
	__u32 fd = regs->di;
	switch (nr) {
	case NR_READ:
		return on_data(fd, (const void *)regs->si, regs->dx, NULL, 0, ret, DIR_INGRESS, SYS_READ);
	case NR_WRITE:
		return on_data(fd, (const void *)regs->si, regs->dx, NULL, 0, ret, DIR_EGRESS, SYS_WRITE);
	case NR_RECVFROM:
		return on_data(fd, (const void *)regs->si, regs->dx, NULL, 0, ret, DIR_INGRESS,
			       SYS_RECVFROM);
	case NR_SENDTO:
		return on_data(fd, (const void *)regs->si, regs->dx, NULL, 0, ret, DIR_EGRESS,
			       SYS_SENDTO);
	case NR_READV:
		if (ret <= 0 || !regs->si)
			return 0;
		return on_data(fd, NULL, 0, (const struct iovec *)regs->si, regs->dx, ret, DIR_INGRESS,
			       SYS_READV);
	case NR_WRITEV:
		if (ret <= 0 || !regs->si)
			return 0;
		return on_data(fd, NULL, 0, (const struct iovec *)regs->si, regs->dx, ret, DIR_EGRESS,
			       SYS_WRITEV);
	case NR_RECVMSG:
		if (ret <= 0 || msg_iov((const struct user_msghdr *)regs->si, &iov, &iovcnt) || !iov)
			return 0;
		return on_data(fd, NULL, 0, iov, iovcnt, ret, DIR_INGRESS, SYS_RECVMSG);
	case NR_SENDMSG:
		if (ret <= 0 || msg_iov((const struct user_msghdr *)regs->si, &iov, &iovcnt) || !iov)
			return 0;
		return on_data(fd, NULL, 0, iov, iovcnt, ret, DIR_EGRESS, SYS_SENDMSG);
	case NR_CLOSE:
		if (ret == 0)
			return on_close(fd);
		return 0;
	case NR_SENDFILE:
	case NR_SPLICE: {
		/* Bytes moved by sendfile/splice are not captured: count them so the gap shows. */
		__u32 out_fd = nr == NR_SENDFILE ? regs->di : regs->dx;
		__u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | out_fd;
		if (ret > 0 && bpf_map_lookup_elem(&live_fds, &key))
			count(C_UNPARSED_SYSCALL);
		return 0;
	}
	default:
		return 0;
	}
}
