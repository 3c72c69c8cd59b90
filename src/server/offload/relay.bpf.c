// SPDX-License-Identifier: MIT
//
// The ChannelData fast path (RFC 8656 §12): a TC program that relays the
// traffic of channel bindings the user-space server installed in its maps,
// below the socket layer.
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
// (TC_ACT_UNSPEC: the next program on the hook, if any, sees it too):
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

static __always_inline int pass(__u32 why)
{
	__u64 *n = bpf_map_lookup_elem(&PASSED, &why);
	if (n)
		*n += 1;
	return TC_ACT_UNSPEC;
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
// leaving with `len` bytes of L3; fills the MACs and returns the egress
// interface, or 0 when the kernel should handle it.
static __always_inline __u32 route(struct __sk_buff *skb, const struct taddr *src,
				   const struct taddr *dst, __u32 len, __u8 *smac, __u8 *dmac,
				   int *why)
{
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ingress_ifindex;
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
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
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

// Client -> server ChannelData on an installed channel: strip the header,
// send from the relayed address to the peer.
static __always_inline int to_peer(struct __sk_buff *skb, struct to_peer *v, int v6, __u32 l3,
				   __u16 payload)
{
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	int why = PASS_ROUTE;
	__u32 l3_len = (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) + sizeof(struct udphdr) +
		       payload;
	__u32 ifindex = route(skb, &v->relay, &v->peer, l3_len, smac, dmac, &why);
	if (!ifindex)
		return pass(why);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l4 = l3 + (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr));
	struct udphdr *udp = data + l4;
	if ((void *)(udp + 1) + 4 > data_end)
		return pass(PASS_SHAPE);
	__be32 old_ports, header;
	__builtin_memcpy(&old_ports, udp, 4);
	__builtin_memcpy(&header, udp + 1, 4);
	__be16 old_len = udp->len;
	__u16 old_check = udp->check;
	__be16 new_len = bpf_htons(sizeof(struct udphdr) + payload);

	// The UDP checksum: the addresses, ports and lengths change and the
	// ChannelData header leaves.
	__be32 from[12] = {}, to[12] = {};
	int n = 0;
	if (v6) {
		struct ipv6hdr *ip6 = data + l3;
		if ((void *)(ip6 + 1) > data_end)
			return pass(PASS_SHAPE);
		__builtin_memcpy(&from[0], &ip6->saddr, 16);
		__builtin_memcpy(&from[4], &ip6->daddr, 16);
		__builtin_memcpy(&to[0], v->relay.ip, 16);
		__builtin_memcpy(&to[4], v->peer.ip, 16);
		n = 8;
	} else {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > data_end)
			return pass(PASS_SHAPE);
		from[0] = ip->saddr;
		from[1] = ip->daddr;
		__builtin_memcpy(&to[0], v->relay.ip, 4);
		__builtin_memcpy(&to[1], v->peer.ip, 4);
		n = 2;
	}
	from[n] = bpf_htonl(bpf_ntohs(old_len));
	to[n] = bpf_htonl(bpf_ntohs(new_len));
	from[n + 1] = old_ports;
	to[n + 1] = pair(v->relay.port, v->peer.port);
	from[n + 2] = pair(old_len, 0);
	to[n + 2] = pair(new_len, 0);
	from[n + 3] = header;
	to[n + 3] = 0;
	__u16 check;
	if (v6)
		check = udp_csum_update(old_check, from, 12 * 4, to, 12 * 4);
	else
		check = udp_csum_update(old_check, from, 6 * 4, to, 6 * 4);
	if (v6 && check == 0)
		return pass(PASS_SHAPE);

	// 4 bytes out right after the IP header: the old UDP header's second
	// half and the ChannelData header make the new UDP header.
	if (bpf_skb_adjust_room(skb, -4, BPF_ADJ_ROOM_NET, 0))
		return pass(PASS_SHAPE);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	udp = data + l4;
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_SHOT;
	if (v6) {
		struct ipv6hdr *ip6 = data + l3;
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_SHOT;
		__builtin_memcpy(&ip6->saddr, v->relay.ip, 16);
		__builtin_memcpy(&ip6->daddr, v->peer.ip, 16);
		ip6->payload_len = new_len;
	} else {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
		__builtin_memcpy(&ip->saddr, v->relay.ip, 4);
		__builtin_memcpy(&ip->daddr, v->peer.ip, 4);
		ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) - 4);
		ip->ttl = 64;
		ip->check = ipv4_csum(ip);
	}
	udp->source = v->relay.port;
	udp->dest = v->peer.port;
	udp->len = new_len;
	udp->check = check;
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	count(v->slot, 0, payload);
	return bpf_redirect(ifindex, 0);
}

// Peer -> relay from a bound peer: prepend the ChannelData header, send
// from the listening address to the client.
static __always_inline int to_client(struct __sk_buff *skb, struct to_client *v, int v6, __u32 l3,
				     __u16 payload)
{
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	int why = PASS_ROUTE;
	__u32 l3_len = (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) + sizeof(struct udphdr) +
		       4 + payload;
	__u32 ifindex = route(skb, &v->server, &v->client, l3_len, smac, dmac, &why);
	if (!ifindex)
		return pass(why);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l4 = l3 + (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr));
	struct udphdr *udp = data + l4;
	if ((void *)(udp + 1) > data_end)
		return pass(PASS_SHAPE);
	__be32 old_ports;
	__builtin_memcpy(&old_ports, udp, 4);
	__be16 old_len = udp->len;
	__u16 old_check = udp->check;
	__be16 new_len = bpf_htons(sizeof(struct udphdr) + 4 + payload);
	__be32 header = bpf_htonl(((__u32)v->channel << 16) | payload);

	__be32 from[12] = {}, to[12] = {};
	int n = 0;
	if (v6) {
		struct ipv6hdr *ip6 = data + l3;
		if ((void *)(ip6 + 1) > data_end)
			return pass(PASS_SHAPE);
		__builtin_memcpy(&from[0], &ip6->saddr, 16);
		__builtin_memcpy(&from[4], &ip6->daddr, 16);
		__builtin_memcpy(&to[0], v->server.ip, 16);
		__builtin_memcpy(&to[4], v->client.ip, 16);
		n = 8;
	} else {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > data_end)
			return pass(PASS_SHAPE);
		from[0] = ip->saddr;
		from[1] = ip->daddr;
		__builtin_memcpy(&to[0], v->server.ip, 4);
		__builtin_memcpy(&to[1], v->client.ip, 4);
		n = 2;
	}
	from[n] = bpf_htonl(bpf_ntohs(old_len));
	to[n] = bpf_htonl(bpf_ntohs(new_len));
	from[n + 1] = old_ports;
	to[n + 1] = pair(v->server.port, v->client.port);
	from[n + 2] = pair(old_len, 0);
	to[n + 2] = pair(new_len, 0);
	from[n + 3] = 0;
	to[n + 3] = header;
	__u16 check;
	if (v6)
		check = udp_csum_update(old_check, from, 12 * 4, to, 12 * 4);
	else
		check = udp_csum_update(old_check, from, 6 * 4, to, 6 * 4);
	if (v6 && check == 0)
		return pass(PASS_SHAPE);

	// 4 bytes in right after the IP header: room for the ChannelData
	// header between the new UDP header and the payload.
	if (bpf_skb_adjust_room(skb, 4, BPF_ADJ_ROOM_NET, 0))
		return pass(PASS_SHAPE);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	udp = data + l4;
	if ((void *)(udp + 1) + 4 > data_end)
		return TC_ACT_SHOT;
	if (v6) {
		struct ipv6hdr *ip6 = data + l3;
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_SHOT;
		__builtin_memcpy(&ip6->saddr, v->server.ip, 16);
		__builtin_memcpy(&ip6->daddr, v->client.ip, 16);
		ip6->payload_len = new_len;
	} else {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
		__builtin_memcpy(&ip->saddr, v->server.ip, 4);
		__builtin_memcpy(&ip->daddr, v->client.ip, 4);
		ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + 4);
		ip->ttl = 64;
		ip->check = ipv4_csum(ip);
	}
	udp->source = v->server.port;
	udp->dest = v->client.port;
	udp->len = new_len;
	udp->check = check;
	__builtin_memcpy(udp + 1, &header, 4);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	count(v->slot, 1, payload);
	return bpf_redirect(ifindex, 0);
}

SEC("classifier")
int turn_channel_data(struct __sk_buff *skb)
{
	// One datagram per skb: GSO/GRO trains go to user space.
	if (skb->gso_segs > 1)
		return pass(PASS_SHAPE);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	__u32 l3 = sizeof(*eth);
	int v6;
	struct taddr src = {}, dst = {};
	struct udphdr *udp;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_UNSPEC;
		// No options, no fragments.
		if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return TC_ACT_UNSPEC;
		v6 = 0;
		src.family = dst.family = 4;
		__builtin_memcpy(src.ip, &ip->saddr, 4);
		__builtin_memcpy(dst.ip, &ip->daddr, 4);
		udp = (void *)(ip + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + l3;
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_UNSPEC;
		// UDP right after the fixed header: no extension headers.
		if (ip6->nexthdr != IPPROTO_UDP)
			return TC_ACT_UNSPEC;
		v6 = 1;
		src.family = dst.family = 6;
		__builtin_memcpy(src.ip, &ip6->saddr, 16);
		__builtin_memcpy(dst.ip, &ip6->daddr, 16);
		udp = (void *)(ip6 + 1);
	} else {
		return TC_ACT_UNSPEC;
	}
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_UNSPEC;
	src.port = udp->source;
	dst.port = udp->dest;
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp) || (void *)udp + udp_len != data_end)
		return TC_ACT_UNSPEC;
	__u16 payload = udp_len - sizeof(*udp);

	// A datagram from a local sender whose checksum the device is to
	// complete (CHECKSUM_PARTIAL, as over veth): its field holds only the
	// pseudo-header sum, which cannot be updated into a full checksum here.
	// The kernel's own path handles it.
	__u64 pseudo = sum16(src.ip, v6 ? 16 : 4) + sum16(dst.ip, v6 ? 16 : 4) + udp->len +
		       bpf_htons(IPPROTO_UDP);
	if (udp->check == fold(pseudo) && udp->check != 0)
		return pass(PASS_PARTIAL);

	// Peer -> relay.
	struct peer_key pk = {};
	pk.peer = src;
	pk.relay = dst;
	struct to_client *tc = bpf_map_lookup_elem(&TO_CLIENT, &pk);
	if (tc) {
		if (bpf_ktime_get_ns() >= tc->expires_ns)
			return pass(PASS_EXPIRED);
		if (payload > 0xffff - 4)
			return pass(PASS_SHAPE);
		return to_client(skb, tc, v6, l3, payload);
	}

	// Client -> server ChannelData: a channel number (0x4000-0x4FFF) and a
	// length that is exactly the rest of the datagram (no padding).
	__u8 *cd = (void *)(udp + 1);
	if ((void *)(cd + 4) > data_end || (cd[0] & 0xf0) != 0x40)
		return TC_ACT_UNSPEC;
	struct client_key ck = {};
	ck.client = src;
	ck.server = dst;
	ck.channel = ((__u16)cd[0] << 8) | cd[1];
	struct to_peer *tp = bpf_map_lookup_elem(&TO_PEER, &ck);
	if (!tp)
		return pass(PASS_NO_BINDING);
	if (bpf_ktime_get_ns() >= tp->expires_ns)
		return pass(PASS_EXPIRED);
	__u16 cd_len = ((__u16)cd[2] << 8) | cd[3];
	if (cd_len != payload - 4)
		return pass(PASS_SHAPE);
	return to_peer(skb, tp, v6, l3, cd_len);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
