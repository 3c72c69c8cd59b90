// SPDX-License-Identifier: MIT
//
// The ChannelData fast path (RFC 8656 §12): programs that relay the
// traffic of channel bindings the user-space server installed in their
// maps, below the socket layer, in two variants sharing everything but how
// the frame grows or shrinks: TC ingress (turn_channel_data) and XDP
// (turn_channel_xdp).
//
//  client -> server   UDP ChannelData to a listening address, for a bound
//                     channel: the 4-byte ChannelData header comes off and
//                     the datagram leaves from the relayed transport address
//                     to the peer;
//  peer -> relay      UDP from a bound peer to its relayed transport
//                     address: a ChannelData header goes on and the datagram
//                     leaves from the listening address to the client.
//
// Anything else is left to the kernel and the server's sockets, untouched
// (TC_ACT_UNSPEC: the next program on the hook, if any, sees it too; or
// XDP_PASS):
// STUN, Send and Data indications, unknown channels, a ChannelData length
// that does not match the datagram (padding), IPv4 options, fragments, IPv6
// extension headers, GSO/GRO-coalesced frames, a datagram that would exceed
// the egress MTU, a destination without a resolved neighbour. Checksums are
// updated incrementally (RFC 1624); the payload keeps its 16-bit alignment,
// so only the headers and the 4 bytes of the ChannelData header count.
//
// The maps are keyed by the exact transport addresses, so the program only
// ever forwards what the server's core permitted: an entry exists only while
// its channel is bound and its peer permitted.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10

// A transport address: IPv4 in the first 4 bytes of `ip` (the rest zero).
struct taddr {
	__u8 ip[16];
	__be16 port;
	__u8 family; // 4 or 6
	__u8 pad;
};

// Client -> server: the client, the listening address it sent to, and the
// channel number.
struct client_key {
	struct taddr client;
	struct taddr server;
	__u16 channel;
	__u16 pad;
};

// Peer -> relay: the peer and the relayed transport address.
struct peer_key {
	struct taddr peer;
	struct taddr relay;
};

// Packets and payload bytes relayed, and when the last one was
// (bpf_ktime_get_ns, CLOCK_MONOTONIC).
struct counters {
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

// Both directions of one binding, in its slot of COUNTERS.
struct binding_counters {
	struct counters to_peer;
	struct counters to_client;
};

// Each direction of a binding holds until `expires_ns` (CLOCK_MONOTONIC):
// the channel's expiry or its peer permission's, whichever comes first.
// `slot` is the binding's entry in COUNTERS, which user space assigns and
// never rewrites while the binding lives: refreshing a binding (a new
// expiry) replaces the map value and leaves the counts alone.
struct to_peer {
	struct taddr relay;
	struct taddr peer;
	__u64 expires_ns;
	__u32 slot;
	__u32 pad;
};

struct to_client {
	struct taddr server;
	struct taddr client;
	__u16 channel;
	__u16 pad;
	__u32 slot;
	__u64 expires_ns;
};

#define MAX_BINDINGS 65536

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, struct client_key);
	__type(value, struct to_peer);
} TO_PEER SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, struct peer_key);
	__type(value, struct to_client);
} TO_CLIENT SEC(".maps");

// Per-CPU counts of each binding (no atomic operations on the data path;
// user space adds the CPUs up).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, __u32);
	__type(value, struct binding_counters);
} COUNTERS SEC(".maps");

// Datagrams left to user space, by reason (see PASS_* below), for
// diagnostics.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} PASSED SEC(".maps");

#define PASS_NO_BINDING 0
#define PASS_SHAPE 1
#define PASS_ROUTE 2
#define PASS_MTU 3
#define PASS_PARTIAL 4
#define PASS_EXPIRED 5

// Counts a datagram left to user space for reason `why`.
static __always_inline void count_pass(__u32 why)
{
	__u64 *n = bpf_map_lookup_elem(&PASSED, &why);
	if (n)
		*n += 1;
}

static __always_inline int pass(__u32 why)
{
	count_pass(why);
	return TC_ACT_UNSPEC;
}

static __always_inline int xdp_pass(__u32 why)
{
	count_pass(why);
	return XDP_PASS;
}

// Sums `n` 16-bit words of `p` (raw, in packet order).
static __always_inline __u64 sum16(const __u8 *p, int n)
{
	__u64 s = 0;
#pragma unroll
	for (int i = 0; i < 16; i += 2) {
		if (i >= n)
			break;
		__u16 w;
		__builtin_memcpy(&w, p + i, 2);
		s += w;
	}
	return s;
}

// Folds a 32-bit one's complement sum to 16 bits.
static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

// The new UDP checksum after the words `from` were replaced by `to`
// (RFC 1624), given the old one; 0 stays 0 (IPv4 "no checksum").
static __always_inline __u16 udp_csum_update(__u16 old, __be32 *from, __u32 from_size,
					     __be32 *to, __u32 to_size)
{
	if (old == 0)
		return 0;
	__s64 sum = bpf_csum_diff(from, from_size, to, to_size, (__u16)~old);
	if (sum < 0)
		return old;
	__u16 folded = ~fold((__u64)sum);
	return folded == 0 ? 0xffff : folded;
}

static __always_inline __u16 ipv4_csum(struct iphdr *iph)
{
	iph->check = 0;
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)iph, sizeof(*iph), 0);
	return ~fold((__u64)sum);
}

// Looks up the route and neighbour for a datagram from `src` to `dst`
// leaving with `len` bytes of L3, as if it arrived on `in_ifindex`; fills
// the MACs and returns the egress interface, or 0 when the kernel should
// handle it (`why` says why).
static __always_inline __u32 route(void *ctx, __u32 in_ifindex, const struct taddr *src,
				   const struct taddr *dst, __u32 len, __u8 *smac, __u8 *dmac,
				   int *why)
{
	struct bpf_fib_lookup fib = {};
	fib.ifindex = in_ifindex;
	fib.l4_protocol = IPPROTO_UDP;
	fib.sport = src->port;
	fib.dport = dst->port;
	fib.tot_len = len;
	if (dst->family == 4) {
		fib.family = AF_INET;
		__builtin_memcpy(&fib.ipv4_src, src->ip, 4);
		__builtin_memcpy(&fib.ipv4_dst, dst->ip, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, src->ip, 16);
		__builtin_memcpy(fib.ipv6_dst, dst->ip, 16);
	}
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		*why = PASS_MTU;
		return 0;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		*why = PASS_ROUTE;
		return 0;
	}
	__builtin_memcpy(smac, fib.smac, ETH_ALEN);
	__builtin_memcpy(dmac, fib.dmac, ETH_ALEN);
	return fib.ifindex;
}

// The 32-bit word of two 16-bit fields in packet order (as the bytes lie
// in the packet, whatever the host's byte order).
static __always_inline __be32 pair(__be16 first, __be16 second)
{
	__be16 both[2] = {first, second};
	__be32 word;
	__builtin_memcpy(&word, both, 4);
	return word;
}

// Counts one datagram of `bytes` payload bytes in this CPU's copy of
// `slot`: to the peer, or to the client.
static __always_inline void count(__u32 slot, int to_client, __u64 bytes)
{
	struct binding_counters *b = bpf_map_lookup_elem(&COUNTERS, &slot);
	if (!b)
		return;
	struct counters *c = to_client ? &b->to_client : &b->to_peer;
	c->packets += 1;
	c->bytes += bytes;
	c->last_ns = bpf_ktime_get_ns();
}

// Every frame starts with an Ethernet header without VLAN tags.
#define L3 sizeof(struct ethhdr)
#define IP4_END (L3 + sizeof(struct iphdr))
#define IP6_END (L3 + sizeof(struct ipv6hdr))

// A datagram the program relays: its binding's new addresses and what
// changes. Client -> peer (`strip`): the ChannelData header comes off;
// peer -> client: `header` goes on.
struct relay {
	const struct taddr *src;
	const struct taddr *dst;
	__u16 payload; // bytes after the UDP and ChannelData headers
	__u16 strip;
	__be32 header;
	__u32 slot;
	__u32 to_client;
	int v6;
};

// How it is rewritten, decided before the frame changes.
struct rewrite {
	__u8 smac[ETH_ALEN];
	__u8 dmac[ETH_ALEN];
	__u32 ifindex;
	__be16 new_len; // UDP length
	__u16 check;
};

// Not a datagram of the fast path: left to the kernel, uncounted.
#define NOT_OURS -1
#define RELAY -2

// Parses the frame at [data, data_end) and looks its binding up: RELAY
// (and `r` filled), NOT_OURS, or the reason it is left to user space.
static __always_inline int classify(void *data, void *data_end, struct relay *r)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return NOT_OURS;
	struct taddr src = {}, dst = {};
	struct udphdr *udp;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + L3;
		if ((void *)(ip + 1) > data_end)
			return NOT_OURS;
		// No options, no fragments.
		if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return NOT_OURS;
		r->v6 = 0;
		src.family = dst.family = 4;
		__builtin_memcpy(src.ip, &ip->saddr, 4);
		__builtin_memcpy(dst.ip, &ip->daddr, 4);
		udp = (void *)(ip + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + L3;
		if ((void *)(ip6 + 1) > data_end)
			return NOT_OURS;
		// UDP right after the fixed header: no extension headers.
		if (ip6->nexthdr != IPPROTO_UDP)
			return NOT_OURS;
		r->v6 = 1;
		src.family = dst.family = 6;
		__builtin_memcpy(src.ip, &ip6->saddr, 16);
		__builtin_memcpy(dst.ip, &ip6->daddr, 16);
		udp = (void *)(ip6 + 1);
	} else {
		return NOT_OURS;
	}
	if ((void *)(udp + 1) > data_end)
		return NOT_OURS;
	src.port = udp->source;
	dst.port = udp->dest;
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp) || (void *)udp + udp_len != data_end)
		return NOT_OURS;
	__u16 payload = udp_len - sizeof(*udp);

	// A datagram from a local sender whose checksum the device is to
	// complete (CHECKSUM_PARTIAL, as over veth): its field holds only the
	// pseudo-header sum, which cannot be updated into a full checksum here.
	// The kernel's own path handles it.
	__u64 pseudo = sum16(src.ip, r->v6 ? 16 : 4) + sum16(dst.ip, r->v6 ? 16 : 4) + udp->len +
		       bpf_htons(IPPROTO_UDP);
	if (udp->check == fold(pseudo) && udp->check != 0)
		return PASS_PARTIAL;

	// Peer -> relay.
	struct peer_key pk = {};
	pk.peer = src;
	pk.relay = dst;
	struct to_client *tc = bpf_map_lookup_elem(&TO_CLIENT, &pk);
	if (tc) {
		if (bpf_ktime_get_ns() >= tc->expires_ns)
			return PASS_EXPIRED;
		if (payload > 0xffff - 4)
			return PASS_SHAPE;
		r->src = &tc->server;
		r->dst = &tc->client;
		r->payload = payload;
		r->strip = 0;
		r->header = bpf_htonl(((__u32)tc->channel << 16) | payload);
		r->slot = tc->slot;
		r->to_client = 1;
		return RELAY;
	}

	// Client -> server ChannelData: a channel number (0x4000-0x4FFF, or up
	// to 0x7FFF where the core accepts RFC 5766's range, as coturn's
	// clients use it) and a length that is exactly the rest of the
	// datagram (no padding). Only installed channels are relayed.
	__u8 *cd = (void *)(udp + 1);
	if ((void *)(cd + 4) > data_end || (cd[0] & 0xc0) != 0x40)
		return NOT_OURS;
	struct client_key ck = {};
	ck.client = src;
	ck.server = dst;
	ck.channel = ((__u16)cd[0] << 8) | cd[1];
	struct to_peer *tp = bpf_map_lookup_elem(&TO_PEER, &ck);
	if (!tp)
		return PASS_NO_BINDING;
	if (bpf_ktime_get_ns() >= tp->expires_ns)
		return PASS_EXPIRED;
	__u16 cd_len = ((__u16)cd[2] << 8) | cd[3];
	if (cd_len != payload - 4)
		return PASS_SHAPE;
	r->src = &tp->relay;
	r->dst = &tp->peer;
	r->payload = cd_len;
	r->strip = 1;
	r->header = 0;
	r->slot = tp->slot;
	r->to_client = 0;
	return RELAY;
}

// Routes `r` and computes its new UDP checksum from the frame as it is:
// -1, or the reason to leave it to user space. The checksum is updated
// incrementally (RFC 1624): addresses, ports and lengths change and the
// ChannelData header leaves or arrives; the payload keeps its 16-bit
// alignment, so it does not count.
static __always_inline int plan(void *ctx, __u32 in_ifindex, void *data, void *data_end,
				const struct relay *r, struct rewrite *w)
{
	int v6 = r->v6;
	__u32 extra = r->strip ? 0 : 4;
	__u32 l3_len = (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
		       sizeof(struct udphdr) + extra + r->payload;
	int why = PASS_ROUTE;
	w->ifindex = route(ctx, in_ifindex, r->src, r->dst, l3_len, w->smac, w->dmac, &why);
	if (!w->ifindex)
		return why;

	__be32 from[12] = {}, to[12] = {};
	int n;
	struct udphdr *udp;
	if (v6) {
		struct ipv6hdr *ip6 = data + L3;
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) + 4 > data_end)
			return PASS_SHAPE;
		__builtin_memcpy(&from[0], &ip6->saddr, 16);
		__builtin_memcpy(&from[4], &ip6->daddr, 16);
		__builtin_memcpy(&to[0], r->src->ip, 16);
		__builtin_memcpy(&to[4], r->dst->ip, 16);
		n = 8;
	} else {
		struct iphdr *ip = data + L3;
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) + 4 > data_end)
			return PASS_SHAPE;
		from[0] = ip->saddr;
		from[1] = ip->daddr;
		__builtin_memcpy(&to[0], r->src->ip, 4);
		__builtin_memcpy(&to[1], r->dst->ip, 4);
		n = 2;
	}
	__be32 old_ports, old_header = 0;
	__builtin_memcpy(&old_ports, udp, 4);
	if (r->strip)
		__builtin_memcpy(&old_header, udp + 1, 4);
	__be16 old_len = udp->len;
	__be16 new_len = bpf_htons(sizeof(struct udphdr) + extra + r->payload);
	from[n] = bpf_htonl(bpf_ntohs(old_len));
	to[n] = bpf_htonl(bpf_ntohs(new_len));
	from[n + 1] = old_ports;
	to[n + 1] = pair(r->src->port, r->dst->port);
	from[n + 2] = pair(old_len, 0);
	to[n + 2] = pair(new_len, 0);
	from[n + 3] = old_header;
	to[n + 3] = r->header;
	__u16 check;
	if (v6)
		check = udp_csum_update(udp->check, from, 12 * 4, to, 12 * 4);
	else
		check = udp_csum_update(udp->check, from, 6 * 4, to, 6 * 4);
	if (v6 && check == 0)
		return PASS_SHAPE;
	w->new_len = new_len;
	w->check = check;
	return -1;
}

// Writes the new headers into a frame whose room was adjusted (4 bytes
// fewer or more between the IP and UDP headers' old places, the Ethernet
// and IP headers still holding their old values): 0, or -1 when the frame
// is too short (never: it was checked before).
static __always_inline int write(void *data, void *data_end, const struct relay *r,
				 const struct rewrite *w)
{
	struct ethhdr *eth = data;
	struct udphdr *udp;
	if (r->v6) {
		struct ipv6hdr *ip6 = data + L3;
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) + 4 > data_end)
			return -1;
		__builtin_memcpy(&ip6->saddr, r->src->ip, 16);
		__builtin_memcpy(&ip6->daddr, r->dst->ip, 16);
		ip6->payload_len = w->new_len;
	} else {
		struct iphdr *ip = data + L3;
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) + 4 > data_end)
			return -1;
		__builtin_memcpy(&ip->saddr, r->src->ip, 4);
		__builtin_memcpy(&ip->daddr, r->dst->ip, 4);
		__u16 tot = bpf_ntohs(ip->tot_len);
		ip->tot_len = bpf_htons(r->strip ? tot - 4 : tot + 4);
		ip->ttl = 64;
		ip->check = ipv4_csum(ip);
	}
	udp->source = r->src->port;
	udp->dest = r->dst->port;
	udp->len = w->new_len;
	udp->check = w->check;
	if (!r->strip)
		__builtin_memcpy(udp + 1, &r->header, 4);
	__builtin_memcpy(eth->h_source, w->smac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, w->dmac, ETH_ALEN);
	return 0;
}

// The TC variant (ingress, TCX): 4 bytes out of or into the skb right
// after the IP header (the old UDP header's first half goes, or room for
// the ChannelData header comes), then the headers are rewritten and the
// skb redirected to the egress interface.
SEC("classifier")
int turn_channel_data(struct __sk_buff *skb)
{
	// One datagram per skb: GSO/GRO trains go to user space.
	if (skb->gso_segs > 1)
		return pass(PASS_SHAPE);
	struct relay r = {};
	int verdict = classify((void *)(long)skb->data, (void *)(long)skb->data_end, &r);
	if (verdict == NOT_OURS)
		return TC_ACT_UNSPEC;
	if (verdict != RELAY)
		return pass(verdict);
	struct rewrite w = {};
	int why = plan(skb, skb->ingress_ifindex, (void *)(long)skb->data,
		       (void *)(long)skb->data_end, &r, &w);
	if (why >= 0)
		return pass(why);
	if (bpf_skb_adjust_room(skb, r.strip ? -4 : 4, BPF_ADJ_ROOM_NET, 0))
		return pass(PASS_SHAPE);
	if (write((void *)(long)skb->data, (void *)(long)skb->data_end, &r, &w))
		return TC_ACT_SHOT;
	count(r.slot, r.to_client, r.payload);
	return bpf_redirect(w.ifindex, 0);
}

// The XDP variant: the frame's start moves 4 bytes (bpf_xdp_adjust_head)
// and the Ethernet and IP headers move with it, then the headers are
// rewritten; out of the interface it came in on (XDP_TX) or redirected to
// another.
SEC("xdp")
int turn_channel_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct relay r = {};
	int verdict = classify(data, data_end, &r);
	if (verdict == NOT_OURS)
		return XDP_PASS;
	if (verdict != RELAY)
		return xdp_pass(verdict);
	struct rewrite w = {};
	int why = plan(ctx, ctx->ingress_ifindex, data, data_end, &r, &w);
	if (why >= 0)
		return xdp_pass(why);
	__u8 saved[IP6_END];
	if (r.v6) {
		if (data + IP6_END > data_end)
			return xdp_pass(PASS_SHAPE);
		__builtin_memcpy(saved, data, IP6_END);
	} else {
		if (data + IP4_END > data_end)
			return xdp_pass(PASS_SHAPE);
		__builtin_memcpy(saved, data, IP4_END);
	}
	if (bpf_xdp_adjust_head(ctx, r.strip ? 4 : -4))
		return xdp_pass(PASS_SHAPE);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (r.v6) {
		if (data + IP6_END > data_end)
			return XDP_DROP;
		__builtin_memcpy(data, saved, IP6_END);
	} else {
		if (data + IP4_END > data_end)
			return XDP_DROP;
		__builtin_memcpy(data, saved, IP4_END);
	}
	if (write(data, data_end, &r, &w))
		return XDP_DROP;
	count(r.slot, r.to_client, r.payload);
	if (w.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(w.ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
