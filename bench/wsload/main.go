// Command wsload is the native load of `nadi bench ws` (bench/ws.py builds and runs it).
//
// Python clients cannot absorb ~180k msgs/s on two cores, so a run with them measures the
// clients, not the server (issue 12). Two modes, each reading one JSON config on stdin and
// printing one JSON result on stdout:
//
//	wsload clients   readers + stalled WebSocket connections against Nadi's /ws or Centrifugo
//	wsload publish   the paced tick publisher for Centrifugo (its HTTP batch API)
//
// Latency is receive time minus the tick's exchange_ts (the publisher's wall clock when it sent
// the tick; same machine, same clock), in 0.1 ms buckets as bench/wsstack.py keeps them.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

const (
	bucketUS  = 100     // histogram resolution: 0.1 ms
	maxBucket = 200_000 // 20 s: anything slower lands in the last bucket
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: wsload clients|publish < config.json")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "clients":
		err = runClients(os.Stdin, os.Stdout)
	case "publish":
		err = runPublish(os.Stdin, os.Stdout)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "wsload:", err)
		os.Exit(1)
	}
}

func wall(t float64) time.Time {
	sec, frac := math.Modf(t)
	return time.Unix(int64(sec), int64(frac*1e9))
}

func sleepUntil(t time.Time) { time.Sleep(time.Until(t)) }

// ---- histograms ---------------------------------------------------------------------------

type hist struct{ b []uint64 }

func newHist() *hist { return &hist{b: make([]uint64, maxBucket+1)} }

func (h *hist) add(ns int64) {
	i := ns / (bucketUS * 1000)
	if i < 0 {
		i = 0
	} else if i > maxBucket {
		i = maxBucket
	}
	atomic.AddUint64(&h.b[i], 1)
}

// quantile in ms at 0.1 ms resolution (the bucket's upper edge), nil when empty.
func (h *hist) quantile(q float64) *float64 {
	var total uint64
	for i := range h.b {
		total += atomic.LoadUint64(&h.b[i])
	}
	if total == 0 {
		return nil
	}
	rank := q * float64(total)
	var seen uint64
	for i := range h.b {
		seen += atomic.LoadUint64(&h.b[i])
		if float64(seen) >= rank {
			v := math.Round(float64(i+1)*bucketUS/100) / 10
			return &v
		}
	}
	return nil
}

// ---- clients ------------------------------------------------------------------------------

type clientsConfig struct {
	URL                string       `json:"url"`
	Protocol           string       `json:"protocol"` // "nadi" or "centrifugo"
	Readers            int          `json:"readers"`
	Stalled            int          `json:"stalled"`
	Tokens             []int64      `json:"tokens"`
	Channel            string       `json:"channel"` // Centrifugo channel, %d = token
	Mode               string       `json:"mode"`    // optional Nadi subscribe mode, passed through
	ConnectAt          float64      `json:"connect_at"`
	OpenRate           float64      `json:"open_rate"` // connections/s; 0 = all at connect_at
	StalledSubscribeAt float64      `json:"stalled_subscribe_at"`
	Phases             [][2]float64 `json:"phases"`
	EndAt              float64      `json:"end_at"`
	StalledRcvBuf      int          `json:"stalled_rcvbuf"`
}

type phaseOut struct {
	Delivered     uint64   `json:"delivered"`
	DeliveredPerS float64  `json:"delivered_per_s"`
	P50           *float64 `json:"p50_ms"`
	P99           *float64 `json:"p99_ms"`
	P999          *float64 `json:"p999_ms"`
	Max           *float64 `json:"max_ms"`
	Frames        uint64   `json:"frames"`
	// Ticks whose exchange_ts falls in the phase, whenever they arrived (before end_at): a
	// count a test can compare exactly with what was published in the phase.
	DeliveredByTs uint64 `json:"delivered_by_ts"`
	// CPU seconds the client process used per second of the phase (2.0 = both cores).
	ClientCPU float64 `json:"client_cpu"`
	// Mean time data waited in the readers' own socket buffers (kernel receive queues / byte
	// rate): what the clients add to the latency. Large means the clients are behind.
	ClientQueueMs float64 `json:"client_queue_ms"`
}

type clientsOut struct {
	Phases            []phaseOut `json:"phases"`
	ReadersSubscribed int64      `json:"readers_subscribed"`
	ReaderFailures    int64      `json:"reader_failures"`
	ReaderErrors      []string   `json:"reader_errors"`
	StalledConnected  int64      `json:"stalled_connected"`
	ClosedByServer    int        `json:"closed_by_server"`
	StalledErrors     []string   `json:"stalled_errors"`
	ConnectSpreadS    *float64   `json:"connect_spread_s"`
	Dropped           int64      `json:"dropped"`          // Nadi `dropped` counts received
	ServerErrors      int64      `json:"server_errors"`    // `error` messages received
	LateSubscribed    int64      `json:"late_subscribed"`  // readers subscribed after phase 1 began
	CentrifugoPings   int64      `json:"centrifugo_pings"` // answered
}

type phaseState struct {
	start, end time.Time
	h          *hist
	n, frames  atomic.Uint64
	bytes      atomic.Uint64
	byTs       atomic.Uint64
	startNs    int64
	endNs      int64
}

type run struct {
	cfg    clientsConfig
	phases []*phaseState
	end    time.Time

	mu            sync.Mutex
	errs          []string
	stallErrs     []string
	firstOpen     time.Time
	lastOpen      time.Time
	readerSocks   map[int]bool
	stalledSocks  map[int]bool
	failures      atomic.Int64
	subscribed    atomic.Int64
	lateSubscribe atomic.Int64
	stalledOK     atomic.Int64
	dropped       atomic.Int64
	serverErrs    atomic.Int64
	pings         atomic.Int64
}

func (r *run) fail(stalled bool, what string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	msg := fmt.Sprintf("%s: %v", what, err)
	if stalled {
		if len(r.stallErrs) < 3 {
			r.stallErrs = append(r.stallErrs, msg)
		}
		return
	}
	r.failures.Add(1)
	if len(r.errs) < 3 {
		r.errs = append(r.errs, msg)
	}
}

func (r *run) opened(key int, stalled bool) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.firstOpen.IsZero() || now.Before(r.firstOpen) {
		r.firstOpen = now
	}
	if now.After(r.lastOpen) {
		r.lastOpen = now
	}
	if stalled {
		r.stalledSocks[key] = true
	} else {
		r.readerSocks[key] = true
	}
}

// dial opens one WebSocket; the local port identifies its socket in /proc/net/tcp.
func (r *run) dial(ctx context.Context, rcvbuf int) (*websocket.Conn, int, error) {
	var local atomic.Int64
	d := &net.Dialer{Timeout: 60 * time.Second}
	if rcvbuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				// Keyed by both ports: Linux reuses an ephemeral port for other destinations.
				local.Store(int64(sockKey(c.LocalAddr().(*net.TCPAddr).Port, c.RemoteAddr().(*net.TCPAddr).Port)))
			}
			return c, err
		},
	}
	dctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(dctx, r.cfg.URL, &websocket.DialOptions{
		HTTPClient:      &http.Client{Transport: tr},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, 0, err
	}
	c.SetReadLimit(64 << 20)
	return c, int(local.Load()), nil
}

var (
	keyTs      = []byte(`"exchange_ts":`)
	keyDropped = []byte(`"type":"dropped","count":`)
	keyError   = []byte(`"type":"error"`)
	keySynced  = []byte(`"type":"synced"`)
)

func leadingInt(b []byte) (int64, bool) {
	n := 0
	for n < len(b) && (b[n] == '-' || (b[n] >= '0' && b[n] <= '9')) {
		n++
	}
	v, err := strconv.ParseInt(string(b[:n]), 10, 64)
	return v, err == nil
}

// centrifugoReply reads frames until the reply to command id (an error reply fails).
func centrifugoReply(ctx context.Context, c *websocket.Conn, id int) error {
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			return err
		}
		for _, line := range bytes.Split(data, []byte("\n")) {
			var rep struct {
				ID    int             `json:"id"`
				Error json.RawMessage `json:"error"`
			}
			if json.Unmarshal(line, &rep) != nil {
				continue
			}
			if rep.Error != nil {
				return fmt.Errorf("centrifugo reply %d: %s", rep.ID, rep.Error)
			}
			if rep.ID == id {
				return nil
			}
		}
	}
}

// handshake opens the session: Centrifugo's connect command (it closes a connection that
// sends none within seconds); nothing for Nadi.
func (r *run) handshake(ctx context.Context, c *websocket.Conn) error {
	if r.cfg.Protocol != "centrifugo" {
		return nil
	}
	hctx, cancel := context.WithTimeout(ctx, 120*time.Second)
	defer cancel()
	if err := c.Write(hctx, websocket.MessageText, []byte(`{"id":1,"connect":{}}`)); err != nil {
		return err
	}
	return centrifugoReply(hctx, c, 1)
}

// sendSubscribe sends the subscription to one instrument.
func (r *run) sendSubscribe(ctx context.Context, c *websocket.Conn, tok int64) error {
	var msg []byte
	if r.cfg.Protocol == "centrifugo" {
		msg = []byte(fmt.Sprintf(`{"id":2,"subscribe":{"channel":%q}}`, fmt.Sprintf(r.cfg.Channel, tok)))
	} else {
		sub := map[string]any{"op": "subscribe", "instruments": []int64{tok}}
		if r.cfg.Mode != "" {
			sub["mode"] = r.cfg.Mode
		}
		msg, _ = json.Marshal(sub)
	}
	return c.Write(ctx, websocket.MessageText, msg)
}

// awaitSubscribed reads until the server confirms the subscription (Nadi's synced, the reply
// to Centrifugo's command 2). Reading answers the server's pings meanwhile; “count“ says
// whether ticks read on the way are a reader's.
func (r *run) awaitSubscribed(ctx context.Context, c *websocket.Conn, count bool) error {
	if r.cfg.Protocol == "centrifugo" {
		return centrifugoReply(ctx, c, 2)
	}
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			return err
		}
		if bytes.Contains(data, keyError) {
			return fmt.Errorf("subscribe refused: %.200s", data)
		}
		if count {
			r.record(data, time.Now())
		}
		if bytes.Contains(data, keySynced) {
			return nil
		}
	}
}

// subscribe sends the subscription and reads until the server confirms it.
func (r *run) subscribe(ctx context.Context, c *websocket.Conn, tok int64) error {
	sctx, cancel := context.WithTimeout(ctx, 120*time.Second)
	defer cancel()
	if err := r.sendSubscribe(sctx, c, tok); err != nil {
		return err
	}
	return r.awaitSubscribed(sctx, c, true)
}

// record adds every tick of one frame to the phase it arrived in.
func (r *run) record(data []byte, now time.Time) {
	var ph *phaseState
	for _, p := range r.phases {
		if !now.Before(p.start) && now.Before(p.end) {
			ph = p
		}
	}
	ns := now.UnixNano()
	rest := data
	var n uint64
	for {
		i := bytes.Index(rest, keyTs)
		if i < 0 {
			break
		}
		rest = rest[i+len(keyTs):]
		if ts, ok := leadingInt(rest); ok {
			n++
			if ph != nil {
				ph.h.add(ns - ts)
			}
			for _, p := range r.phases {
				if ts >= p.startNs && ts < p.endNs {
					p.byTs.Add(1)
				}
			}
		}
	}
	if i := bytes.Index(data, keyDropped); i >= 0 {
		if v, ok := leadingInt(data[i+len(keyDropped):]); ok {
			r.dropped.Add(v)
		}
	}
	if bytes.Contains(data, keyError) {
		r.serverErrs.Add(1)
	}
	if ph != nil {
		ph.n.Add(n)
		ph.frames.Add(1)
		ph.bytes.Add(uint64(len(data)))
	}
}

func (r *run) reader(k int, openAt time.Time, wg *sync.WaitGroup) {
	defer wg.Done()
	sleepUntil(openAt)
	ctx, cancel := context.WithDeadline(context.Background(), r.end)
	defer cancel()
	c, port, err := r.dial(ctx, 0)
	if err != nil {
		r.fail(false, "connect", err)
		return
	}
	defer c.CloseNow()
	r.opened(port, false)
	if err := r.handshake(ctx, c); err != nil {
		r.fail(false, "connect", err)
		return
	}
	if err := r.subscribe(ctx, c, r.cfg.Tokens[k%len(r.cfg.Tokens)]); err != nil {
		r.fail(false, "subscribe", err)
		return
	}
	r.subscribed.Add(1)
	if len(r.phases) > 0 && time.Now().After(r.phases[0].start) {
		r.lateSubscribe.Add(1)
	}
	centrifugo := r.cfg.Protocol == "centrifugo"
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			if time.Now().Before(r.end.Add(-50 * time.Millisecond)) {
				r.fail(false, "read", err)
			}
			return
		}
		r.record(data, time.Now())
		// Centrifugo pings with an empty command and disconnects a client that does not pong.
		if centrifugo && (bytes.Equal(data, []byte("{}")) || bytes.HasSuffix(data, []byte("\n{}")) ||
			bytes.HasPrefix(data, []byte("{}\n")) || bytes.Contains(data, []byte("\n{}\n"))) {
			r.pings.Add(1)
			_ = c.Write(ctx, websocket.MessageText, []byte("{}"))
		}
	}
}

// staller connects with a tiny receive buffer, subscribes at stalled_subscribe_at, then never
// reads again.
func (r *run) staller(k int, openAt time.Time, wg *sync.WaitGroup, hold chan struct{}) {
	defer wg.Done()
	sleepUntil(openAt)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, port, err := r.dial(ctx, r.cfg.StalledRcvBuf)
	if err != nil {
		r.fail(true, "connect", err)
		return
	}
	defer c.CloseNow()
	r.opened(port, true)
	if err := r.handshake(ctx, c); err != nil {
		r.fail(true, "connect", err)
		return
	}
	// Until it subscribes the connection reads (so it answers the server's keepalive pings,
	// as an idle screen does); from the confirmation on it never reads again.
	subAt := wall(r.cfg.StalledSubscribeAt)
	sctx, scancel := context.WithDeadline(ctx, subAt.Add(120*time.Second))
	defer scancel()
	confirmed := make(chan error, 1)
	go func() { confirmed <- r.awaitSubscribed(sctx, c, false) }()
	sleepUntil(subAt)
	if err := r.sendSubscribe(sctx, c, r.cfg.Tokens[k%len(r.cfg.Tokens)]); err != nil {
		r.fail(true, "subscribe", err)
		return
	}
	if err := <-confirmed; err != nil {
		r.fail(true, "subscribe", err)
		return
	}
	r.stalledOK.Add(1)
	<-hold
}

func sockKey(localPort, remotePort int) int { return localPort<<16 | remotePort }

// tcpSockets reads /proc/net/tcp: sockKey(local, remote port) -> (state, rx queue bytes).
func tcpSockets() map[int][2]int64 {
	out := map[int][2]int64{}
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 {
			continue
		}
		la := strings.Split(fs[1], ":")
		ra := strings.Split(fs[2], ":")
		q := strings.Split(fs[4], ":")
		if len(la) != 2 || len(ra) != 2 || len(q) != 2 {
			continue
		}
		lp, _ := strconv.ParseInt(la[1], 16, 32)
		rp, _ := strconv.ParseInt(ra[1], 16, 32)
		st, _ := strconv.ParseInt(fs[3], 16, 32)
		rx, _ := strconv.ParseInt(q[1], 16, 64)
		out[sockKey(int(lp), int(rp))] = [2]int64{st, rx}
	}
	return out
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func runClients(in io.Reader, out io.Writer) error {
	var cfg clientsConfig
	if err := json.NewDecoder(in).Decode(&cfg); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if len(cfg.Tokens) == 0 || cfg.Readers < 0 || cfg.Stalled < 0 {
		return errors.New("config: tokens, readers and stalled are required")
	}
	r := &run{cfg: cfg, end: wall(cfg.EndAt), readerSocks: map[int]bool{}, stalledSocks: map[int]bool{}}
	for _, p := range cfg.Phases {
		a, b := wall(p[0]), wall(p[1])
		r.phases = append(r.phases, &phaseState{start: a, end: b, h: newHist(),
			startNs: a.UnixNano(), endNs: b.UnixNano()})
	}
	// Opening order: the stalled connections spread evenly among the readers, so an open rate
	// opens both kinds throughout.
	total := cfg.Readers + cfg.Stalled
	var wg sync.WaitGroup
	hold := make(chan struct{})
	reader, stalled := 0, 0
	for k := 0; k < total; k++ {
		at := wall(cfg.ConnectAt)
		if cfg.OpenRate > 0 {
			at = at.Add(time.Duration(float64(k) / cfg.OpenRate * 1e9))
		}
		wg.Add(1)
		if (k+1)*cfg.Stalled/total > k*cfg.Stalled/total {
			go r.staller(stalled, at, &wg, hold)
			stalled++
		} else {
			go r.reader(reader, at, &wg)
			reader++
		}
	}
	// Per phase: CPU used and the readers' receive-queue backlog, sampled every 100 ms.
	res := clientsOut{}
	for _, p := range r.phases {
		sleepUntil(p.start)
		cpu0 := cpuSeconds()
		var qsum float64
		samples := 0
		for time.Now().Before(p.end) {
			socks := tcpSockets()
			r.mu.Lock()
			var rx int64
			for port := range r.readerSocks {
				rx += socks[port][1]
			}
			r.mu.Unlock()
			qsum += float64(rx)
			samples++
			time.Sleep(100 * time.Millisecond)
		}
		secs := p.end.Sub(p.start).Seconds()
		po := phaseOut{
			Delivered:     p.n.Load(),
			DeliveredPerS: math.Round(float64(p.n.Load()) / secs),
			P50:           p.h.quantile(0.5),
			P99:           p.h.quantile(0.99),
			P999:          p.h.quantile(0.999),
			Max:           p.h.quantile(1.0),
			Frames:        p.frames.Load(),
			ClientCPU:     math.Round((cpuSeconds()-cpu0)/secs*100) / 100,
		}
		if byteRate := float64(p.bytes.Load()) / secs; samples > 0 && byteRate > 0 {
			po.ClientQueueMs = math.Round(qsum/float64(samples)/byteRate*1e4) / 10
		}
		res.Phases = append(res.Phases, po)
	}
	sleepUntil(r.end)
	// A stalled socket the server closed is no longer ESTABLISHED (01) on our side.
	socks := tcpSockets()
	r.mu.Lock()
	for port := range r.stalledSocks {
		if s, ok := socks[port]; !ok || s[0] != 1 {
			res.ClosedByServer++
		}
	}
	r.mu.Unlock()
	close(hold)
	wg.Wait()
	for i, p := range r.phases {
		res.Phases[i].DeliveredByTs = p.byTs.Load()
	}
	res.ReadersSubscribed = r.subscribed.Load()
	res.ReaderFailures = r.failures.Load()
	res.ReaderErrors = append([]string{}, r.errs...)
	res.StalledErrors = append([]string{}, r.stallErrs...)
	res.StalledConnected = r.stalledOK.Load()
	res.Dropped = r.dropped.Load()
	res.ServerErrors = r.serverErrs.Load()
	res.LateSubscribed = r.lateSubscribe.Load()
	res.CentrifugoPings = r.pings.Load()
	if !r.firstOpen.IsZero() {
		v := math.Round(r.lastOpen.Sub(r.firstOpen).Seconds()*100) / 100
		res.ConnectSpreadS = &v
	}
	return json.NewEncoder(out).Encode(res)
}

// ---- the Centrifugo publisher ---------------------------------------------------------------

type publishConfig struct {
	URL      string  `json:"url"` // http://host:port/api/batch
	APIKey   string  `json:"api_key"`
	Tokens   []int64 `json:"tokens"`
	Channel  string  `json:"channel"`
	Rate     int     `json:"rate"`
	StartAt  float64 `json:"start_at"`
	Duration float64 `json:"duration_s"`
	InFlight int     `json:"in_flight"` // concurrent requests (default 4)
}

type publishOut struct {
	Sent     int64    `json:"sent"`
	SentPerS float64  `json:"sent_per_s"`
	Requests int64    `json:"requests"`
	Errors   int64    `json:"errors"`
	Error    []string `json:"error_samples"`
	// Slots (5 ms each) that started more than 5 ms late: the publisher could not keep pace.
	LateSlots int64 `json:"late_slots"`
	Slots     int64 `json:"slots"`
}

func runPublish(in io.Reader, out io.Writer) error {
	var cfg publishConfig
	if err := json.NewDecoder(in).Decode(&cfg); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if cfg.InFlight <= 0 {
		cfg.InFlight = 4
	}
	client := &http.Client{Timeout: 30 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: cfg.InFlight}}
	seq := map[int64]int64{}
	price := map[int64]float64{}
	for _, t := range cfg.Tokens {
		price[t] = 100 + float64(t%997)
	}
	const slot = 5 * time.Millisecond
	const maxBatch = 500
	var mu sync.Mutex
	var wg sync.WaitGroup
	res := publishOut{}
	// Up to in_flight requests at once: a server slow to answer one request does not hold
	// the publisher to one request per round trip. A batch is built (its ticks stamped) only
	// once a request slot is free, so time waiting for one is never counted as latency.
	free := make(chan struct{}, cfg.InFlight)
	for k := 0; k < cfg.InFlight; k++ {
		free <- struct{}{}
	}
	post := func(body []byte, n int64) {
		defer wg.Done()
		defer func() { free <- struct{}{} }()
		req, _ := http.NewRequest(http.MethodPost, cfg.URL, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if cfg.APIKey != "" {
			req.Header.Set("X-API-Key", cfg.APIKey)
		}
		resp, err := client.Do(req)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || bytes.Contains(b, []byte(`"error"`)) {
				err = fmt.Errorf("HTTP %d: %.200s", resp.StatusCode, b)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			res.Errors++
			if len(res.Error) < 3 {
				res.Error = append(res.Error, err.Error())
			}
			return
		}
		res.Sent += n
	}
	sleepUntil(wall(cfg.StartAt))
	t0 := time.Now()
	dur := time.Duration(cfg.Duration * 1e9)
	var sent, requests, slots, late int64
	i := 0
	for s := int64(1); ; {
		<-free
		elapsed := time.Since(t0)
		if elapsed >= dur {
			free <- struct{}{}
			break
		}
		slots++
		due := int64((elapsed + slot).Seconds() * float64(cfg.Rate))
		// A publisher that fell behind catches up in requests of at most maxBatch ticks: one
		// huge request would be slower still and time out (and its ticks would be lost).
		if due-sent > maxBatch {
			due = sent + maxBatch
		}
		if due > sent {
			var body bytes.Buffer
			body.WriteString(`{"commands":[`)
			for n := int64(0); sent+n < due; n++ {
				tok := cfg.Tokens[i%len(cfg.Tokens)]
				i++
				seq[tok]++
				if (i*7919)%3 != 0 {
					price[tok] += 0.05
				} else {
					price[tok] = math.Max(1, price[tok]-0.05)
				}
				if n > 0 {
					body.WriteByte(',')
				}
				// The same fields as Nadi's tick message, so both servers carry frames of one size.
				fmt.Fprintf(&body, `{"publish":{"channel":"`+cfg.Channel+`","data":{"type":"tick","offset":null,`+
					`"instrument_token":%d,"sequence_id":%d,"exchange_ts":%d,"last_price":%.2f,"exchange":"NSE",`+
					`"last_qty":1,"volume":%d,"feed":"A","status":"OK"}}}`,
					tok, tok, seq[tok], time.Now().UnixNano(), price[tok], seq[tok])
			}
			body.WriteString(`]}`)
			wg.Add(1)
			requests++
			go post(body.Bytes(), due-sent)
			sent = due
		} else {
			free <- struct{}{}
		}
		// The next 5 ms slot; one that started a whole slot late makes the publisher late.
		next := int64(time.Since(t0)/slot) + 1
		if next > s+1 {
			late++
		}
		s = next
		sleepUntil(t0.Add(time.Duration(s) * slot))
	}
	wg.Wait()
	res.Requests, res.Slots, res.LateSlots = requests, slots, late
	res.SentPerS = math.Round(float64(res.Sent) / time.Since(t0).Seconds())
	return json.NewEncoder(out).Encode(res)
}
