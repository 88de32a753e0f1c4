import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DeliverCallback;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * Seed article, "重试机制": basicReject(deliveryTag, requeue). With requeue=true the message
 * comes back (isRedeliver()==true); with requeue=false it is discarded.
 *
 * Usage: java SeedReject HOST PORT
 */
public class SeedReject {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedReject: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedReject", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        String QUEUE_NAME = "seed.reject." + System.nanoTime();

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel()) {
            channel.queueDeclare(QUEUE_NAME, true, false, false, null);
            channel.basicPublish("", QUEUE_NAME, MessageProperties.PERSISTENT_TEXT_PLAIN, "poison".getBytes());

            // A consumer that rejects: requeue on the first attempt, discard on the retry.
            BlockingQueue<String> log = new LinkedBlockingQueue<>();
            DeliverCallback deliverCallback = (consumerTag, delivery) -> {
                long deliveryTag = delivery.getEnvelope().getDeliveryTag();
                boolean redelivered = delivery.getEnvelope().isRedeliver();
                boolean requeue = !redelivered;
                channel.basicReject(deliveryTag, requeue);
                log.add(new String(delivery.getBody(), StandardCharsets.UTF_8)
                        + " redeliver=" + redelivered + " rejected requeue=" + requeue);
            };
            String tag = channel.basicConsume(QUEUE_NAME, false, deliverCallback, consumerTag -> {});

            String first = log.poll(10, TimeUnit.SECONDS);
            check("poison redeliver=false rejected requeue=true".equals(first),
                    "first delivery was rejected with requeue=true (" + first + ")");
            String second = log.poll(10, TimeUnit.SECONDS);
            check("poison redeliver=true rejected requeue=false".equals(second),
                    "reject with requeue=true redelivered it with isRedeliver()==true; rejected again with requeue=false ("
                            + second + ")");
            check(log.poll(1, TimeUnit.SECONDS) == null,
                    "after reject with requeue=false the message is not delivered again");
            channel.basicCancel(tag);
            int left = channel.queueDeclarePassive(QUEUE_NAME).getMessageCount();
            check(left == 0, "reject with requeue=false removed it from the queue (message count " + left + ")");

            // The same with basicGet, one message at a time.
            channel.basicPublish("", QUEUE_NAME, MessageProperties.PERSISTENT_TEXT_PLAIN, "second".getBytes());
            GetResponse got = channel.basicGet(QUEUE_NAME, false);
            check(got != null && !got.getEnvelope().isRedeliver(), "basicGet returned the new message");
            channel.basicReject(got.getEnvelope().getDeliveryTag(), true);
            got = channel.basicGet(QUEUE_NAME, false);
            check(got != null && "second".equals(new String(got.getBody(), StandardCharsets.UTF_8)),
                    "after basicReject(tag, true) basicGet returns it again");
            check(got.getEnvelope().isRedeliver(), "marked isRedeliver()==true");
            channel.basicReject(got.getEnvelope().getDeliveryTag(), false);
            check(channel.basicGet(QUEUE_NAME, false) == null, "after basicReject(tag, false) the queue is empty");

            channel.queueDelete(QUEUE_NAME);
        }
        System.out.println("PASS SeedReject");
        System.exit(0);
    }
}
