// The example order service in Go: a service that only answers HTTP, behind the managed live
// lane (a RetryPipeline with `liveLane: {}` and an `http` handler). It embeds no SDK: the
// operator's live lane and tier workers consume Kafka and POST each order here, and the status
// this service answers decides where the order goes next (docs/http.md):
//
//   - 2xx: handled.
//   - 503: the payments connector of a "flaky" bank failed: retried on the next tier after its
//     delay (5xx is retriable by default). northwind fails the first attempt, fabrikam two.
//     With $PAYMENTS_URL (the demo's fake payments upstream, examples/order_service/payments.py)
//     the order is charged there instead, and its 5xx, 408, 429 or no answer is the 503.
//   - 500 with `X-Kafka-Retry-Error: non-retriable`: a coupon such as `SAVE15%` hits a pricing
//     bug that retrying cannot fix, so the service says so and the order goes to the DLQ at
//     once, to be replayed after the fix (the `couponPercentFix` flag in the JSON file named by
//     $ORDER_SERVICE_FLAGS, re-read on every order).
//   - 400 (not an order) and 401 (no or a wrong shared secret) are not retriable by default.
//
// With $ORDER_SERVICE_TOKEN set (from the same Secret as the pipeline's
// `handler.http.secretRef`), only callers sending `Authorization: Bearer <token>` are served.
// Each answer is logged to stdout as one JSON object a line.
//
//	go run . -addr 127.0.0.1:8090
package main

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// flakyAttempts: bank -> how many charge attempts its payments connector fails.
var flakyAttempts = map[string]int{"northwind": 1, "fabrikam": 2}

type item struct {
	SKU       string `json:"sku"`
	Qty       int    `json:"qty"`
	UnitCents int    `json:"unit_cents"`
}

type order struct {
	ID     string `json:"id"`
	Items  []item `json:"items"`
	Coupon string `json:"coupon"`
	Bank   string `json:"bank"`
}

// outcome is one answer, as logged: what the pipeline's workers sent and what they got back.
type outcome struct {
	Order   string `json:"order"`
	Tier    string `json:"tier"`
	Attempt int    `json:"attempt"`
	DueMs   int64  `json:"dueMs,omitempty"`
	AtMs    int64  `json:"atMs"`
	Status  int    `json:"status"`
	Error   string `json:"error,omitempty"`
}

type service struct {
	token    string
	flags    string
	payments string // the upstream's base URL; "" charges nowhere (flakyAttempts decides)
	client   *http.Client
	mu       sync.Mutex
	out      *json.Encoder
}

func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/healthz" {
		w.WriteHeader(http.StatusOK)
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/orders" {
		http.NotFound(w, r)
		return
	}
	o := outcome{
		Tier:    r.Header.Get("X-Kafka-Retry-Tier"),
		Attempt: atoi(r.Header.Get("X-Kafka-Retry-Attempt")),
		DueMs:   int64(atoi(r.Header.Get("X-Kafka-Retry-Due-Ms"))),
		AtMs:    time.Now().UnixMilli(),
	}
	var verdict string
	o.Status, o.Error, verdict = s.handle(r, &o)
	if verdict != "" {
		w.Header().Set("X-Kafka-Retry-Error", verdict)
	}
	w.WriteHeader(o.Status)
	if o.Error != "" {
		fmt.Fprintln(w, o.Error)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_ = s.out.Encode(o)
}

// handle returns the status to answer, for a failure why, and the verdict to state in
// `X-Kafka-Retry-Error` where the status alone would be judged otherwise.
func (s *service) handle(r *http.Request, o *outcome) (int, string, string) {
	if s.token != "" {
		got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if subtle.ConstantTimeCompare([]byte(got), []byte(s.token)) != 1 {
			return http.StatusUnauthorized, "not the pipeline's workers", ""
		}
	}
	var ord order
	if err := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20)).Decode(&ord); err != nil {
		return http.StatusBadRequest, "not an order: " + err.Error(), ""
	}
	o.Order = ord.ID
	amount, err := s.price(ord)
	if err != nil {
		// A 500 is retriable by default, but a bug fails the same way every time.
		return http.StatusInternalServerError, err.Error(), "non-retriable"
	}
	status, why := s.charge(r, ord, amount, o)
	return status, why, ""
}

// charge charges the order: through the payments upstream when there is one, by the order id
// as idempotency key (the pipeline is at-least-once), with the X-Demo-* headers that feed the
// demo's ledger; otherwise a flaky bank fails its first attempts.
func (s *service) charge(r *http.Request, ord order, amount int, o *outcome) (int, string) {
	if s.payments == "" {
		if o.Attempt <= flakyAttempts[ord.Bank] {
			return http.StatusServiceUnavailable, "payments: " + ord.Bank + " unavailable"
		}
		return http.StatusOK, ""
	}
	body, _ := json.Marshal(map[string]any{"order": ord.ID, "bank": ord.Bank, "amountCents": amount})
	req, err := http.NewRequest(http.MethodPost, s.payments+"/charges", bytes.NewReader(body))
	if err != nil {
		return http.StatusInternalServerError, "payments URL: " + err.Error()
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", ord.ID)
	req.Header.Set("X-Demo-Stage", o.Tier)
	req.Header.Set("X-Demo-Attempt", strconv.Itoa(o.Attempt))
	req.Header.Set("X-Demo-Replay-Id", r.Header.Get("X-Kafka-Retry-Replay-Id"))
	resp, err := s.client.Do(req)
	if err != nil {
		return http.StatusServiceUnavailable, "payments unreachable: " + err.Error()
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	switch code := resp.StatusCode; {
	case code < 300:
		return http.StatusOK, ""
	case code >= 500 || code == http.StatusRequestTimeout || code == http.StatusTooManyRequests:
		return http.StatusServiceUnavailable, "payments answered " + resp.Status
	default:
		return http.StatusUnprocessableEntity, "payments refused the charge: " + resp.Status
	}
}

// price has the demo's bug: a percent sign in a coupon code breaks it, unless the
// `couponPercentFix` flag is on.
func (s *service) price(ord order) (int, error) {
	total := 0
	for _, it := range ord.Items {
		total += it.Qty * it.UnitCents
	}
	if !strings.HasPrefix(ord.Coupon, "SAVE") {
		return total, nil
	}
	code := strings.TrimPrefix(ord.Coupon, "SAVE")
	if s.fixed() {
		code = strings.TrimSuffix(code, "%")
	}
	percent, err := strconv.Atoi(code)
	if err != nil {
		return 0, fmt.Errorf("pricing coupon %q: %w", ord.Coupon, err)
	}
	return total * (100 - percent) / 100, nil
}

func (s *service) fixed() bool {
	if s.flags == "" {
		return false
	}
	raw, err := os.ReadFile(s.flags)
	if err != nil {
		return false
	}
	var flags map[string]bool
	return json.Unmarshal(raw, &flags) == nil && flags["couponPercentFix"]
}

func atoi(text string) int {
	n, _ := strconv.Atoi(text)
	return n
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8090", "listen address")
	flag.Parse()
	svc := &service{
		token:    os.Getenv("ORDER_SERVICE_TOKEN"),
		flags:    os.Getenv("ORDER_SERVICE_FLAGS"),
		payments: strings.TrimSuffix(os.Getenv("PAYMENTS_URL"), "/"),
		client:   &http.Client{Timeout: 5 * time.Second},
		out:      json.NewEncoder(os.Stdout),
	}
	server := &http.Server{Addr: *addr, Handler: svc, ReadHeaderTimeout: 10 * time.Second}
	log.SetOutput(os.Stderr)
	log.Printf("order service on %s", *addr)
	log.Fatal(server.ListenAndServe())
}
