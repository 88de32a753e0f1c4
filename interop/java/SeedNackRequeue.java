import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DeliverCallback;
import com.rabbitmq.client.Delivery;
import com.rabbitmq.client.MessageProperties;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Seed article, the catch branch of the manual-ack consumer:
 * basicNack(deliveryTag, false, true) puts the message back in the queue. The first attempt
 * fails, the redelivery (isRedeliver()==true) succeeds and is acked.
 *
 * Usage: java SeedNackRequeue HOST PORT
 */
public class SeedNackRequeue {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedNackRequeue: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedNackRequeue", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        String QUEUE_NAME = "seed.nack." + System.nanoTime();

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel()) {
            channel.queueDeclare(QUEUE_NAME, true, false, false, null);
            channel.basicPublish("", QUEUE_NAME, MessageProperties.PERSISTENT_TEXT_PLAIN,
                    "flaky job".getBytes());

            AtomicInteger attempts = new AtomicInteger();
            BlockingQueue<String> log = new LinkedBlockingQueue<>();
            DeliverCallback deliverCallback = (consumerTag, delivery) -> {
                long deliveryTag = delivery.getEnvelope().getDeliveryTag();
                String seen = new String(delivery.getBody(), StandardCharsets.UTF_8)
                        + " redeliver=" + delivery.getEnvelope().isRedeliver();
                try {
                    // 接收消息，业务处理: the first attempt fails
                    if (attempts.incrementAndGet() == 1) {
                        throw new IllegalStateException("simulated processing failure");
                    }
                    channel.basicAck(deliveryTag, false);
                    log.add("acked " + seen);
                } catch (Exception e) {
                    // 负确认（nack），让消息重回队列
                    channel.basicNack(deliveryTag, false, true);
                    log.add("nacked " + seen);
                }
            };
            boolean autoAck = false;
            String tag = channel.basicConsume(QUEUE_NAME, autoAck, deliverCallback, consumerTag -> {});

            String first = log.poll(10, TimeUnit.SECONDS);
            check("nacked flaky job redeliver=false".equals(first),
                    "first delivery (isRedeliver()==false) was nacked with requeue (" + first + ")");
            String second = log.poll(10, TimeUnit.SECONDS);
            check("acked flaky job redeliver=true".equals(second),
                    "the message was redelivered with isRedeliver()==true and acked (" + second + ")");
            check(log.poll(500, TimeUnit.MILLISECONDS) == null, "there is no third delivery");
            channel.basicCancel(tag);
            int left = channel.queueDeclarePassive(QUEUE_NAME).getMessageCount();
            check(left == 0, "the queue is empty after the ack (message count " + left + ")");

            channel.queueDelete(QUEUE_NAME);
        }
        System.out.println("PASS SeedNackRequeue");
        System.exit(0);
    }
}
