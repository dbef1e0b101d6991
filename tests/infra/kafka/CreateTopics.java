// Create or delete the worker's topics on the local test broker.
//
// kcat has no admin commands and kafka-tools (TopicCommand) would add
// connect-runtime, Jetty and Jersey to the download, so this uses the
// AdminClient from kafka-clients, which is already in .cache/kafka-lib.
// Run with Java's single-file source launcher (no build step):
//
//   java -cp '.cache/kafka-lib/*' CreateTopics.java BOOTSTRAP create PARTITIONS TOPIC...
//   java -cp '.cache/kafka-lib/*' CreateTopics.java BOOTSTRAP delete TOPIC...
//
// Both modes are idempotent: an existing topic is not an error on create,
// a missing one is not an error on delete. A TOPIC may carry its own
// partition count as NAME:N. Exits non-zero on any other failure.

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.KafkaFuture;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.errors.UnknownTopicOrPartitionException;

public class CreateTopics {
    private static void usage() {
        System.err.println("usage: CreateTopics BOOTSTRAP create PARTITIONS TOPIC[:N]...\n"
                + "       CreateTopics BOOTSTRAP delete TOPIC...");
        System.exit(2);
    }

    private static void waitForLeaders(Admin admin, List<String> names) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        while (true) {
            try {
                Map<String, TopicDescription> d = admin.describeTopics(names)
                        .allTopicNames().get(10, TimeUnit.SECONDS);
                boolean ready = d.values().stream().allMatch(t -> t.partitions().stream()
                        .allMatch(p -> p.leader() != null && !p.leader().isEmpty()));
                if (ready)
                    return;
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof UnknownTopicOrPartitionException))
                    throw e;
            }
            if (System.nanoTime() > deadline)
                throw new IllegalStateException("topics have no leaders after 20 s: " + names);
            Thread.sleep(50);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 3)
            usage();
        String bootstrap = args[0];
        String mode = args[1];

        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        // Fail in seconds, not after the 60 s defaults, when the broker is down.
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "15000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "20000");

        int failed = 0;
        List<String> names;
        try (Admin admin = Admin.create(props)) {
            Map<String, KafkaFuture<Void>> results;
            if (mode.equals("create")) {
                if (args.length < 4)
                    usage();
                int defaultPartitions = Integer.parseInt(args[2]);
                List<NewTopic> topics = new ArrayList<>();
                names = new ArrayList<>();
                for (int i = 3; i < args.length; i++) {
                    String name = args[i];
                    int partitions = defaultPartitions;
                    int colon = name.lastIndexOf(':');
                    if (colon > 0) {
                        partitions = Integer.parseInt(name.substring(colon + 1));
                        name = name.substring(0, colon);
                    }
                    // Replication factor 1: a single-node cluster has one replica.
                    topics.add(new NewTopic(name, partitions, (short) 1));
                    names.add(name);
                }
                results = admin.createTopics(topics).values();
            } else if (mode.equals("delete")) {
                names = List.of(args).subList(2, args.length);
                results = admin.deleteTopics(names).topicNameValues();
            } else {
                usage();
                return;
            }

            // Report in the order asked for, not the result map's order.
            for (String name : names) {
                KafkaFuture<Void> result = results.get(name);
                String verdict;
                try {
                    result.get(30, TimeUnit.SECONDS);
                    verdict = mode.equals("create") ? "created" : "deleted";
                } catch (ExecutionException ex) {
                    Throwable cause = ex.getCause();
                    if (mode.equals("create") && cause instanceof TopicExistsException) {
                        verdict = "exists";
                    } else if (mode.equals("delete")
                            && cause instanceof UnknownTopicOrPartitionException) {
                        verdict = "absent";
                    } else {
                        verdict = "FAILED: " + cause;
                        failed++;
                    }
                }
                System.out.println(name + ": " + verdict);
            }

            // CreateTopics returns once the controller has committed the
            // topics; the broker serves them a moment later. Wait for that
            // here so a test can produce right away without retrying.
            if (failed == 0 && mode.equals("create"))
                waitForLeaders(admin, names);
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}
