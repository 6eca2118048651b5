package dev.kro.peer;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;

/**
 * The Spring Kafka peer of bench/peers.py: one {@code @RetryableTopic} listener, as a Spring
 * Boot service would write it, run on the same broker and the same events as ours.
 *
 * <p>Everything the benchmark reads is on stdout: {@code READY} once the main and retry
 * listeners own their partitions, then one {@code EV} line per handler call (see {@link
 * EventLog}). The harness measures this process's CPU from /proc; nothing here times itself.
 */
@SpringBootApplication
public class SpringPeer {
    public static void main(String[] args) {
        SpringApplication.run(SpringPeer.class, args);
    }
}
